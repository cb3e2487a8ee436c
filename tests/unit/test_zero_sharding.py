"""Native ZeRO-1 (:mod:`raymoe.train.zero`): the partition math, the plan's optimizer bytes, and two gloo processes
training a replicated and a ZeRO-1 copy of the tiny model side by side (no Ray), with their checkpoints."""
from __future__ import annotations

import pathlib
import random

import pytest
import torch

from raymoe.config import ConfigError, ModelConfig, ParallelConfig
from raymoe.train.zero import Bucket, owned_pieces, plan_buckets


def _check_partition(numels: list[int], n: int, cap: int) -> list[Bucket]:
    buckets = plan_buckets(numels, n, cap)
    # buckets cover the parameters in order; each is within the cap unless it holds a single larger tensor
    assert [b.start for b in buckets] == [0] + [b.stop for b in buckets[:-1]] and buckets[-1].stop == len(numels)
    for b in buckets:
        assert b.numel == sum(numels[b.start:b.stop])
        assert b.numel <= cap or b.stop - b.start == 1
        assert b.padded % n == 0 and 0 <= b.padded - b.numel < n and b.shard * n == b.padded
        if b.stop < len(numels):  # greedy: the next tensor did not fit
            assert b.numel + numels[b.stop] > cap
    covered = [[0] * k for k in numels]
    for m in range(n):
        used: dict[int, list[tuple[int, int]]] = {}
        seen = set()
        for pc in owned_pieces(numels, buckets, m):
            assert pc.index not in seen  # at most one piece per parameter per member
            seen.add(pc.index)
            bk = buckets[pc.bucket]
            assert bk.start <= pc.index < bk.stop
            assert 0 <= pc.offset and pc.offset + pc.numel <= bk.shard
            # the piece sits at the same place in the padded bucket as in the flat layout of the parameters
            assert m * bk.shard + pc.offset == sum(numels[bk.start:pc.index]) + pc.lo
            used.setdefault(pc.bucket, []).append((pc.offset, pc.offset + pc.numel))
            for e in range(pc.lo, pc.hi):
                covered[pc.index][e] += 1
        for spans in used.values():  # pieces of one bucket never overlap in the member's shard
            spans.sort()
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert all(c == 1 for cov in covered for c in cov), "every element owned exactly once"
    return buckets


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_pieces_tile_every_parameter_exactly_once(n: int) -> None:
    rng = random.Random(n)
    for cap in (1, 5, 16, 64, 10_000):
        numels = [rng.randint(1, 40) for _ in range(rng.randint(1, 12))]
        _check_partition(numels, n, cap)


def test_buckets_pad_and_split() -> None:
    # 3 + 4 = 7 fits a cap of 8; 9 is larger than the cap (own bucket); 2 starts the last
    b = plan_buckets([3, 4, 9, 2], 4, 8)
    assert [(x.start, x.stop, x.numel, x.padded, x.shard) for x in b] == [(0, 2, 7, 8, 2), (2, 3, 9, 12, 3),
                                                                          (3, 4, 2, 4, 1)]
    # member 1 of 4 owns elements 2..3 of the first bucket: param 0's element 2 and param 1's element 0
    p = owned_pieces([3, 4, 9, 2], b, 1)
    assert [(x.index, x.lo, x.hi, x.bucket, x.offset) for x in p] == [(0, 2, 3, 0, 0), (1, 0, 1, 0, 1),
                                                                      (2, 3, 6, 1, 0), (3, 1, 2, 2, 0)]
    # a dtype change closes a bucket
    assert [(x.start, x.stop) for x in plan_buckets([1, 1, 1], 2, 100, ["f", "f", "b"])] == [(0, 2), (2, 3)]
    # padding owns nothing: with 2 elements over 4 members, members 2 and 3 own no piece
    assert owned_pieces([2], plan_buckets([2], 4), 3) == []


def test_native_zero_stage_is_validated() -> None:
    assert ParallelConfig(dp_impl="native").zero_stage == 1  # the default: ZeRO-1 for native as for DeepSpeed
    ParallelConfig(dp_impl="native", zero_stage=0)
    with pytest.raises(ConfigError, match="parallel.zero_stage=2 with parallel.dp_impl=native; allowed: 0, 1"):
        ParallelConfig(dp_impl="native", zero_stage=2)


@pytest.mark.parametrize("pp,ep,dp,schedule", [(1, 1, 2, "1f1b"), (1, 2, 2, "1f1b"), (2, 2, 2, "1f1b"),
                                               (2, 1, 4, "dualpipe"), (2, 4, 1, "1f1b")])
def test_partition_of_each_rank_matches_the_plan(pp: int, ep: int, dp: int, schedule: str) -> None:
    """The elements each rank owns under the runtime's partition (its real parameter sets, from the meta model
    after apply_pp / apply_ep) equal the plan's ZeRO-1 term up to bucket padding, and each group's members own every
    element once."""
    from raymoe.plan import Cluster, TrainLayout, plan_training
    from raymoe.train import parallelize as par
    from raymoe.train.topology import Topology

    cfg = ModelConfig.preset("tiny")
    C = 2 * pp if schedule == "dualpipe" else pp
    topo = Topology(pp, ep, dp, schedule, C, cfg)
    plan = plan_training(cfg, TrainLayout(pp=pp, ep=ep, dp=dp, schedule=schedule, num_microbatches=C, zero1=True,
                                          precision="fp32"), Cluster(num_nodes=1, gpus_per_node=pp * ep * dp))
    cap = 5000  # several buckets per set
    for r in range(topo.world_size):
        c = topo.coords(r)
        model = par.build_model(cfg, 0, device="meta")
        par.apply_pp(model, topo, r)
        par.apply_ep(model, topo, r, None)
        experts = par.is_expert_param(model)
        named = [(n, p) for n, p in model.named_parameters()]
        owned, pad = 0, 0
        for sel, n, member in ((lambda p: id(p) not in experts, ep * dp, c.data_rank),
                               (lambda p: id(p) in experts, dp, c.dp_rank)):
            numels = [p.numel() for _, p in named if sel(p)]
            buckets = _check_partition(numels, n, cap) if r == 0 else plan_buckets(numels, n, cap)
            owned += sum(pc.numel for pc in owned_pieces(numels, buckets, member))
            pad += len(buckets)
        want = plan.ranks[c.pp_rank].optimizer / 8  # fp32: exp_avg + exp_avg_sq, 8 bytes per element
        assert abs(owned - want) <= pad, (r, owned, want)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[pathlib.Path, list[dict]]:
    """ep=1 × dp=2 on two gloo processes: both copies train 4 steps (step 2 skipped, clipping active, weight decay
    on matrices only, buckets of 30k elements) and save their checkpoints."""
    from raymoe.jobs.benches.zero import spawn

    out = tmp_path_factory.mktemp("zero")
    res = spawn({"ep": 1, "dp": 2, "steps": 4, "skip": [2], "clip": 0.5, "wd": 0.1, "bucket": 30_000, "save": True,
                 "keep": True}, str(out))
    return out, res


def test_zero1_trains_like_replicated_dp(two_ranks) -> None:
    from safetensors.torch import load_file

    out, res = two_ranks
    for r in res:
        assert r["buckets"] > 2
        assert r["weight_rel_diff"] <= 1e-4, r["weight_rel_diff"]
        assert r["norms_rep"][0] > 0.5  # the clip engaged
        for a, b in zip(r["norms_zero"], r["norms_rep"]):
            assert abs(a - b) <= 1e-6 * b
        # replicated: the full moments; ZeRO-1: half of them, up to the padding of each bucket
        assert abs(2 * r["state_bytes_zero"] - r["state_bytes_rep"]) <= 8 * 2 * r["buckets"]
    assert res[0]["norms_zero"] == res[1]["norms_zero"]  # every rank steps with the same global norm
    w0, w1 = (load_file(str(out / f"params{i}.safetensors")) for i in range(2))
    assert all(torch.equal(w0[n], w1[n]) for n in w0)  # the all-gather leaves replicas bit-identical


def _full_state(ckpt: pathlib.Path, names: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    from raymoe.train.sharded import ShardIndex

    idx = ShardIndex(ckpt)
    try:
        return {f"{k}/{n}": idx.read_flat(f"{k}/{n}", 0, s.numel()).view(s) for n, s in names.items()
                for k in ("exp_avg", "exp_avg_sq")}
    finally:
        idx.close()


def test_zero1_checkpoint_is_dp_independent(two_ranks) -> None:
    """Each rank wrote its pieces as ranges of the full tensors: read back in any cut they equal the replicated
    run's moments; and a one-rank replicated model loads them (dp 2 → 1) to the replicated run's state."""
    from raymoe.optim import GuardedAdamW, param_groups
    from raymoe.train import sharded
    from raymoe.train.parallelize import build_model
    from raymoe.train.topology import Topology

    out, _ = two_ranks
    files = sorted(p.name for p in (out / "ckpt_zero" / "shards").iterdir())
    assert files == ["pp0_ep0.safetensors", "pp0_ep0_dp1.safetensors"]
    cfg = ModelConfig.preset("tiny")
    model = build_model(cfg, 0)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    rep, zero = _full_state(out / "ckpt_rep", shapes), _full_state(out / "ckpt_zero", shapes)
    for k in rep:
        assert torch.allclose(zero[k], rep[k], rtol=1e-4, atol=1e-9), k
    # arbitrary cuts (another dp degree's pieces) read the same elements
    idx = sharded.ShardIndex(out / "ckpt_zero")
    try:
        name = "layers.0.self_attn.o_proj.weight"
        flat = zero[f"exp_avg/{name}"].reshape(-1)
        for lo, hi in ((0, 1), (5, 4000), (flat.numel() - 3, flat.numel())):
            assert torch.equal(idx.read_flat(f"exp_avg/{name}", lo, hi), flat[lo:hi])
    finally:
        idx.close()
    # dp 2 (ZeRO-1) → dp 1 (replicated, world of one)
    topo = Topology(1, 1, 1, "1f1b", 1, cfg)
    opt = GuardedAdamW(param_groups(model, 0.1), lr=1e-3)
    sharded.load_rank(model, opt, topo, 0, out / "ckpt_zero")
    for n, p in model.named_parameters():
        assert torch.equal(opt.state[p]["exp_avg"], zero[f"exp_avg/{n}"]), n
        assert float(opt.state[p]["step"]) == 3.0  # 4 steps, one skipped
