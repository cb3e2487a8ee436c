"""`python -m raymoe.jobs.bench replica_memory`: what an engine replica holds with local vs remote routed experts.

For each model preset in ``presets=`` (default ``tiny,small``; random weights, fp32, saved as a HF checkpoint under a
scratch directory) the engine is built twice, each in a fresh process (so its RSS is its own):

* ``local``: ``LLMEngine.from_pretrained`` with the model's own experts (``experts.backend: local``);
* ``remote``: ``shards=`` 2 expert-shard processes (``python -m raymoe.engine.remote --checkpoint``) that read their
  slots' rows from the checkpoint themselves, and an engine whose model is loaded without routed experts
  (``experts.remote.expert_weights: checkpoint``, what the Serve app does).

Each engine generates ``tokens=`` 16 greedy tokens for 2 prompts; the table reports the engine's parameter bytes,
routed-expert parameter bytes, its KV cache (``num_blocks=`` 256 blocks of 16 tokens), its fused-projection weight
cache (serving keeps concatenated MLA / dense / shared-expert gate+up weights: a second copy of those), and its
process RSS after generating (``VmRSS``; ``growth`` = minus the RSS after importing torch and raymoe, before
loading; ``peak`` = ``VmHWM``), plus each shard process's RSS.

Raises if an equality fails: remote parameter bytes = local parameter bytes − local routed-expert bytes (to the
byte), the remote engine holds no routed-expert parameter, the shards' slots hold exactly the local engine's
routed-expert bytes (no redundant slots), and both engines produce the same greedy tokens.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pathlib
import tempfile
from typing import Any, Optional

PROMPTS = [[5, 17, 42, 7, 99, 3, 11, 64], [8, 8, 120, 33, 2]]


def _proc_kb(pid: Optional[int], field: str) -> int:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _measure(ckpt: str, addrs: Optional[list], tokens: int, num_blocks: int, out: Any) -> None:
    """One engine in this (fresh) process; puts its numbers on ``out``."""
    import torch

    from raymoe.engine import EngineConfig, LLMEngine, ReplicatedExperts, SamplingParams
    from raymoe.engine.experts import param_summary
    from raymoe.engine.remote import RemoteShard

    torch.set_num_threads(1)
    rss0 = _proc_kb(None, "VmRSS")
    backend = None
    if addrs:
        shards = [RemoteShard(tuple(a), f"s{i}") for i, a in enumerate(addrs)]
        backend = ReplicatedExperts(None, num_shards=len(shards), shard_factory=lambda i: shards[i])
        backend.needs_expert_weights = False
    eng = LLMEngine.from_pretrained(ckpt, EngineConfig(num_blocks=num_blocks, block_size=16), expert_backend=backend)
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=tokens, temperature=0))
    ps = param_summary(eng.model)
    fused = sum(m._fused_weight_cache["w"].numel() * m._fused_weight_cache["w"].element_size()
                for m in eng.model.modules() if "w" in getattr(m, "_fused_weight_cache", {}))
    out.put({"param_bytes": ps["bytes"], "routed_expert_bytes": ps["routed_expert_bytes"],
             "routed_expert_params": ps["routed_expert_params"],
             "kv_bytes": eng.cache.buf.numel() * eng.cache.buf.element_size(), "fused_cache_bytes": fused,
             "rss_bytes": 1024 * _proc_kb(None, "VmRSS"), "peak_rss_bytes": 1024 * _proc_kb(None, "VmHWM"),
             "base_rss_bytes": 1024 * rss0, "tokens": [o.outputs[0].token_ids for o in outs],
             "shard_slot_bytes": sum(3 * len(v) * eng.model_config.hidden_size
                                     * eng.model_config.moe_intermediate_size * 4
                                     for s in (backend.shards if backend else []) for v in s.slot_experts.values())})
    if backend is not None:
        for s in backend.shards:
            s.close()


def _run_child(ckpt: str, addrs: Optional[list], tokens: int, num_blocks: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_measure, args=(ckpt, addrs, tokens, num_blocks, q))
    p.start()
    try:
        res = q.get(timeout=900)
    finally:
        p.join(timeout=60)
    if p.exitcode not in (0, None):
        raise RuntimeError(f"measuring process exited with {p.exitcode}")
    return res


def _checkpoint(preset: str, root: pathlib.Path) -> pathlib.Path:
    import torch

    from raymoe.config import ModelConfig
    from raymoe.model import hf
    from raymoe.model.transformer import DeepSeekV3

    path = root / preset
    torch.manual_seed(0)
    hf.save(DeepSeekV3(ModelConfig.preset(preset)), path)
    return path


def run(args: dict[str, str]) -> dict:
    from rich.console import Console
    from rich.table import Table

    from raymoe.engine.remote import spawn_shard_processes

    presets = args.get("presets", "tiny,small").split(",")
    n_shards, tokens = int(args.get("shards", "2")), int(args.get("tokens", "16"))
    num_blocks = int(args.get("num_blocks", "256"))
    mib = 1 / (1 << 20)
    results: dict[str, Any] = {}
    table = Table(title=f"engine replica memory: local vs remote experts ({n_shards} shards reading the checkpoint)")
    for c in ("model", "experts", "params MiB", "routed MiB", "KV MiB", "fused MiB", "params+KV+fused MiB",
              "RSS MiB", "RSS growth MiB", "peak RSS MiB", "shards RSS MiB"):
        table.add_column(c, justify="right")
    with tempfile.TemporaryDirectory(prefix="raymoe-replica-mem-") as tmp:
        for preset in presets:
            ckpt = _checkpoint(preset, pathlib.Path(tmp))
            local = _run_child(str(ckpt), None, tokens, num_blocks)
            procs: list = []
            try:
                addrs = spawn_shard_processes(n_shards, procs, checkpoint=str(ckpt))
                remote = _run_child(str(ckpt), [list(a) for a in addrs], tokens, num_blocks)
                remote["shard_rss_bytes"] = [1024 * _proc_kb(p.pid, "VmRSS") for p in procs]
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            non_expert = local["param_bytes"] - local["routed_expert_bytes"]
            if remote["param_bytes"] != non_expert or remote["routed_expert_params"] != 0:
                raise AssertionError(f"{preset}: the remote engine holds {remote['param_bytes']} parameter bytes "
                                     f"({remote['routed_expert_params']} routed-expert tensors); expected "
                                     f"{non_expert} (local minus its routed experts) and none")
            if remote["shard_slot_bytes"] != local["routed_expert_bytes"]:  # no redundant slots: each expert once
                raise AssertionError(f"{preset}: the shards hold {remote['shard_slot_bytes']} slot bytes, the local "
                                     f"engine's routed experts are {local['routed_expert_bytes']}")
            if remote["tokens"] != local["tokens"]:
                raise AssertionError(f"{preset}: greedy tokens differ: local {local['tokens']}, remote "
                                     f"{remote['tokens']}")
            for name, r in (("local", local), ("remote", remote)):
                r["accounted_bytes"] = r["param_bytes"] + r["kv_bytes"] + r["fused_cache_bytes"]
                table.add_row(preset, name, f"{r['param_bytes'] * mib:.1f}", f"{r['routed_expert_bytes'] * mib:.1f}",
                              f"{r['kv_bytes'] * mib:.1f}", f"{r['fused_cache_bytes'] * mib:.1f}",
                              f"{r['accounted_bytes'] * mib:.1f}", f"{r['rss_bytes'] * mib:.0f}",
                              f"{(r['rss_bytes'] - r['base_rss_bytes']) * mib:.0f}", f"{r['peak_rss_bytes'] * mib:.0f}",
                              "/".join(f"{b * mib:.0f}" for b in r.get("shard_rss_bytes", [])) or "-")
            results[preset] = {"local": local, "remote": remote,
                               "param_ratio_remote_local": remote["param_bytes"] / local["param_bytes"],
                               "rss_ratio_remote_local": remote["rss_bytes"] / local["rss_bytes"],
                               "non_expert_bytes": non_expert}
            for r in (local, remote):
                r.pop("tokens")
    Console(width=200).print(table)
    for p, r in results.items():
        print(f"{p}: remote/local parameter bytes {r['param_ratio_remote_local']:.3f}, RSS "
              f"{r['rss_ratio_remote_local']:.3f}; remote engine = non-expert weights "
              f"{r['non_expert_bytes'] * mib:.1f} MiB + KV {r['remote']['kv_bytes'] * mib:.1f} MiB + fused cache "
              f"{r['remote']['fused_cache_bytes'] * mib:.1f} MiB")
    return {"presets": results, "shards": n_shards, "tokens": tokens, "num_blocks": num_blocks,
            "pid": os.getpid()}
