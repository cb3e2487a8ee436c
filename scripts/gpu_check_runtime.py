#!/usr/bin/env python
"""Check the training runtime's device path on a CUDA GPU: the pipeline worker with ``parallel.backend=nccl``.

One GPU hosts one rank (NCCL does not put two ranks on one device), so this runs a world of one in-process
(``LocalWorkerGroup``): model, activations, gradient reduction and the optimizer on the GPU, collectives on the
NCCL backend. It trains the tiny model for a few fp32 steps with the native runtime on the GPU and on the CPU and
compares the per-step losses (TF32 off; expect agreement to ~1e-5 relative). Multi-rank NCCL (P2P between stages,
all-to-all between expert shards) needs a multi-GPU node: run ``pytest tests/integration/test_pipeline_actors.py``
there with ``parallel.backend=nccl`` in the test's config.

    python scripts/gpu_check_runtime.py --out gpu_runtime.json     # no GPU: writes {"skipped": ...}, exit 0
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(backend: str, steps: int, root: pathlib.Path) -> dict:
    import torch

    from raymoe.config import DataConfig, LoggerConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from raymoe.data import prepare_data
    from raymoe.train.controller import TrainController
    from raymoe.train.worker_group import LocalWorkerGroup

    run = RunConfig(model=ModelConfig.preset("tiny"), parallel=ParallelConfig(backend=backend, dp_impl="native"),
                    train=TrainConfig(steps=steps, micro_batch_size=2, num_microbatches=2, checkpoint_every=steps,
                                      eval_every=steps, eval_batches=2, warmup_tokens=0, seed=0, export_hf=False),
                    data=DataConfig(seq_len=64), logger=LoggerConfig(kind="none"), run_dir=str(root / backend))
    info = prepare_data(run, progress=False)
    if backend == "nccl":
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    group = LocalWorkerGroup(run, _port())
    ctl = TrainController(run, group, info["train_samples"], info["val_samples"])
    t0 = time.perf_counter()
    summary = ctl.run_loop()
    wall = time.perf_counter() - t0
    device = str(next(group.worker.model.parameters()).device)
    group.shutdown()
    ctl.close()
    return {"losses": summary["losses"], "val_loss": summary["val_loss"], "wall_s": wall, "device": device}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_runtime.json")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    import torch

    out = pathlib.Path(args.out)
    if not torch.cuda.is_available():
        out.write_text(json.dumps({"skipped": "no CUDA device"}))
        print("no CUDA device: skipped")
        return 0
    with tempfile.TemporaryDirectory() as d:
        gpu = train("nccl", args.steps, pathlib.Path(d))
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        cpu = train("gloo", args.steps, pathlib.Path(d))
    rel = max(abs(a - b) / abs(b) for a, b in zip(gpu["losses"], cpu["losses"]))
    ok = gpu["device"].startswith("cuda") and rel < 1e-4
    res = {"gpu": gpu, "cpu": cpu, "max_rel_loss_diff": rel, "ok": ok}
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
