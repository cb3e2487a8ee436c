"""Overlapped expert all-to-all (raymoe.experts.overlap) on 2 gloo ranks: same numbers as the synchronous path.

Each rank holds a tiny DeepSeek-V3 with its routed experts sharded over ep = 2. An F&B-like unit (forward of micro-batch
A, backward of micro-batch B) runs once in order and once as two cooperative lanes with one ep group per lane; the
losses and every gradient must match, and the meter must have seen exactly the exchanges the layers issue.
"""
from __future__ import annotations

import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raymoe.config import ModelConfig

SPAWN_TIMEOUT_S = 120


def _cfg() -> ModelConfig:
    return ModelConfig.preset("tiny").replace(vocab_size=512)


def _batch(seed: int, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    return ids, labels


def _unit(rank: int, group, lane_group, recompute: str) -> None:
    from raymoe.experts import moe_layers, shard_experts
    from raymoe.experts.overlap import METER, backward_lane, run_lanes
    from raymoe.experts.parallel import set_lane_groups
    from raymoe.model import DeepSeekV3
    from raymoe.model.recompute import set_recompute

    cfg = _cfg()
    a, b = _batch(100 + rank, cfg), _batch(200 + rank, cfg)
    results = {}
    for mode in ("sequential", "lanes"):
        torch.manual_seed(0)
        model = shard_experts(DeepSeekV3(cfg), rank, 2, group)
        set_recompute(model, recompute)
        if mode == "lanes":
            assert set_lane_groups(model, (group, lane_group)) == len(moe_layers(model))
        out_b = model(*b)  # micro-batch B's forward happened earlier (its activations are live)
        out = {}

        def fwd_a() -> None:
            out["a"] = model(*a)

        def bwd_b() -> None:
            with backward_lane():
                out_b.loss.backward()

        before = METER.snapshot()
        if mode == "lanes":
            run_lanes([fwd_a, bwd_b])
        else:
            fwd_a()
            bwd_b()
        seen = METER.snapshot().minus(before)
        out["a"].loss.backward()
        n_moe = len(moe_layers(model))
        fwd_x = 3 * n_moe  # counts, dispatch, combine per MoE layer
        bwd_x = 2 * n_moe + (fwd_x if recompute == "full" else 0)  # reversed dispatch/combine (+ the re-run forward)
        assert seen.count == fwd_x + bwd_x, (mode, seen)
        assert 0.0 <= seen.exposed_s <= seen.total_s + 1e-3, (mode, seen)
        results[mode] = (out["a"].loss.detach(), out_b.loss.detach(),
                         {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (la, lb, g), (la2, lb2, g2) = results["sequential"], results["lanes"]
    assert torch.equal(la, la2) and torch.equal(lb, lb2), (rank, la, la2, lb, lb2)
    assert g.keys() == g2.keys() and g
    for n in g:
        err = (g[n] - g2[n]).abs().max().item()
        assert err <= 1e-6 * max(1.0, g[n].abs().max().item()), f"rank {rank} {n}: {err}"


def _worker(rank: int, port: int, recompute: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=SPAWN_TIMEOUT_S))
    try:
        lane = dist.new_group([0, 1])
        for mode in recompute:
            _unit(rank, None, lane, mode)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lanes_give_the_sequential_losses_and_grads() -> None:
    """Forward of A beside backward of B (plain and with full recompute, whose backward re-runs the forward's
    exchanges) as two lanes over two ep groups: the same losses and gradients as one after the other."""
    ctx = mp.start_processes(_worker, args=(_free_port(), ["none", "full"]), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"overlap workers did not finish within {SPAWN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


def test_lanes_hand_the_baton_over_and_propagate_errors() -> None:
    """Without any exchange the lanes run one after the other (lane 0 first) in two threads; a lane's exception
    reaches the caller after both ended."""
    from raymoe.experts.overlap import run_lanes

    order: list[int] = []
    res, held = run_lanes([lambda: order.append(0) or "a", lambda: order.append(1) or "b"])
    assert res == ["a", "b"] and order == [0, 1] and len(held) == 2

    def boom() -> None:
        raise ValueError("lane failed")

    with pytest.raises(ValueError, match="lane failed"):
        run_lanes([lambda: None, boom])


def test_runner_fuses_only_independent_forward_backward_neighbours() -> None:
    """With overlap on, run_unit pairs adjacent ops of different micro-batches with at most one backward and no W;
    the units of DualPipe pp=2 C=4 rank 0 (``F0 F0r F1 B0r F1r&B0 B1r Bi1 W1``) and 1F1B rank 1 (same-micro-batch
    ``F0 B0`` stays apart) are exactly these."""
    from raymoe.schedule import build
    from raymoe.schedule.executor import QueueTransport, StageRunner

    def units(name: str, rank: int) -> list[list[str]]:
        s = build(name, 2, 4)
        r = StageRunner(s, rank, {k: torch.nn.Identity() for k in s.chunks(rank)}, QueueTransport(),
                        lambda y, t: y.sum(), overlap=True)
        out, pos = [], 0
        while pos < len(r.ops):
            op, nxt = r.ops[pos], r.ops[pos + 1] if pos + 1 < len(r.ops) else None
            if nxt is not None and r._fusable(op, nxt):
                out.append([str(op), str(nxt)])
                pos += 2
            else:
                out.append([str(op)])
                pos += 1
        return out

    assert units("dualpipe", 0) == [["F0", "F0r"], ["F1", "B0r"], ["F1r&B0"], ["B1r"], ["Bi1"], ["W1"]]
    assert units("1f1b", 1) == [["F0"], ["B0", "F1"], ["B1", "F2"], ["B2", "F3"], ["B3"]]
    assert units("zb1p", 0) == [["F0", "F1"], ["Bi0"], ["W0"], ["F2", "Bi1"], ["W1"], ["F3", "Bi2"], ["W2"],
                                ["Bi3"], ["W3"]]
