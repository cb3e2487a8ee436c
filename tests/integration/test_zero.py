"""Native ZeRO-1 on Ray actors (``parallel.zero_stage=1``, :mod:`raymoe.train.zero`) against replicated native DP
(``zero_stage=0``) on the same global batches, and a dp 2 → 1 → 2 resize through its checkpoints.

The tiny model in fp32, as in test_pipeline_actors.py: per-step losses and the final weights (assembled from each
run's sharded checkpoint) must agree to fp32 reduction order.
"""
from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from raymoe.config import DataConfig, LoggerConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig

pytestmark = pytest.mark.usefixtures("ray_session")

REL = 1e-5


def _run(tmp: pathlib.Path, name: str, *, zero: int, pp: int = 1, ep: int = 1, dp: int = 1, C: int = 2,
         steps: int = 4, schedule: str = "1f1b", **train_kw) -> RunConfig:
    train = dict(steps=steps, micro_batch_size=1, num_microbatches=C, checkpoint_every=steps, eval_every=steps,
                 eval_batches=1, warmup_tokens=64, seed=0, export_hf=False, grad_clip=0.5, weight_decay=0.1)
    train.update(train_kw)
    return RunConfig(
        model=ModelConfig.preset("tiny"),
        parallel=ParallelConfig(pp=pp, ep=ep, dp=dp, schedule=schedule, num_cpus_per_rank=0.25, dp_impl="native",
                                zero_stage=zero),
        train=TrainConfig(**train),
        data=DataConfig(seq_len=32),
        logger=LoggerConfig(kind="none"),
        run_dir=str(tmp / name),
    )


def _drive(run: RunConfig) -> dict:
    import ray

    from raymoe.actors import Coordinator

    coord = Coordinator.remote(run)
    try:
        ray.get(coord.setup.remote(), timeout=300)
        summary = ray.get(coord.run_training.remote(), timeout=600)
        ray.get(coord.shutdown.remote(), timeout=60)
        return summary
    finally:
        ray.kill(coord)


def _weights(summary: dict) -> dict:
    from raymoe.model import DeepSeekV3
    from raymoe.train.sharded import assemble_full

    model = assemble_full(pathlib.Path(summary["checkpoint"]), DeepSeekV3(ModelConfig.preset("tiny")))
    return {n: p.detach() for n, p in model.named_parameters()}


def _close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= REL * abs(y), (a, b)


def _same_weights(w: dict, ref: dict, rel: float = 1e-3) -> None:
    """Per tensor: the distance to the reference is tiny against how far training moved it."""
    from raymoe.train.parallelize import build_model

    w0 = {n: p.detach() for n, p in build_model(ModelConfig.preset("tiny"), 0).named_parameters()}
    assert w.keys() == ref.keys()
    for n in ref:
        err, moved = (w[n] - ref[n]).norm().item(), (ref[n] - w0[n]).norm().item()
        assert moved > 0, f"{n} never trained"
        assert err <= rel * moved, f"{n}: |w - w_ref| {err:.3g} vs |w_ref - w0| {moved:.3g}"


@pytest.mark.parametrize("layout", [dict(dp=2, C=2), dict(ep=2, dp=2, C=1),
                                    dict(pp=2, dp=2, C=4, schedule="dualpipe")],
                         ids=["pp1xep1xdp2", "ep2xdp2", "dualpipe-pp2xdp2"])
def test_zero1_equals_replicated_native_dp(tmp_path, layout) -> None:
    """Dense state sharded over ep × dp, expert state over dp, global-norm clipping active (grad_clip=0.5), weight
    decay on matrices: the same losses and weights (several buckets per set: tests/unit/test_zero_sharding.py). Under DualPipe
    both pipeline ranks hold every stage: each copy shards its state over its own dp group, both copies get the
    same summed gradients and updates, and only pipeline rank 0 writes the state."""
    rep = _drive(_run(tmp_path, "rep", zero=0, **layout))
    z = _drive(_run(tmp_path, "zero", zero=1, **layout))
    _close(z["losses"], rep["losses"])
    norms_rep, norms_z = _grad_norms(tmp_path / "rep"), _grad_norms(tmp_path / "zero")
    assert norms_rep[0] > 0.5  # the clip engaged
    _close(norms_z, norms_rep)  # the global norm from the owned pieces equals the unsharded one
    _same_weights(_weights(z), _weights(rep))
    shards = sorted(p.name for p in (pathlib.Path(z["checkpoint"]) / "shards").iterdir())
    # every rank wrote its pieces of the optimizer state (dp rank 0 also the weights)
    want = ["pp0_ep0.safetensors", "pp0_ep0_dp1.safetensors"]
    if layout.get("ep") == 2:
        want += ["pp0_ep1.safetensors", "pp0_ep1_dp1.safetensors"]
    if layout.get("pp") == 2:
        want += ["pp1_ep0.safetensors"]  # dp rank 0 of pipeline rank 1: the (empty) shard of the copies' holder
    assert shards == sorted(want)


def _grad_norms(run_dir: pathlib.Path) -> list[float]:
    last: dict[int, float] = {}
    for line in open(run_dir / "metrics.jsonl"):
        r = json.loads(line)
        if "train/grad_norm" in r:
            last[r["step"]] = r["train/grad_norm"]
    return [last[k] for k in sorted(last)]


def _fork(src: pathlib.Path, step: int, dst: pathlib.Path) -> None:
    name = f"step_{step:08d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)


def test_zero1_resizes_2_to_1_to_2_through_checkpoints(tmp_path) -> None:
    """dp=2 under ZeRO-1 saves at step 2; dp=1 (twice the micro-batches: the same global batch; replicated state)
    resumes from it and saves at step 4; dp=2 under ZeRO-1 resumes from that to step 6. The losses of every step
    equal the uninterrupted dp=2 run's, and so do the final weights. (Every run is configured for 6 steps: the LR
    schedule's decay depends on the total.)"""
    full = _drive(_run(tmp_path, "full", zero=1, dp=2, C=2, steps=6, checkpoint_every=2))
    _fork(tmp_path / "full", 2, tmp_path / "one")
    one = _drive(_run(tmp_path, "one", zero=1, dp=1, C=4, steps=6, checkpoint_every=2))
    assert one["resumed_from"].endswith("step_00000002")
    _close(one["losses"], full["losses"])
    _fork(tmp_path / "one", 4, tmp_path / "two")
    two = _drive(_run(tmp_path, "two", zero=1, dp=2, C=2, steps=6, checkpoint_every=2))
    assert two["resumed_from"].endswith("step_00000004")
    _close(two["losses"], full["losses"])
    _same_weights(_weights(two), _weights(full))
