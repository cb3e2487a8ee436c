"""Expert parallelism (raymoe.experts): exchange, ExpertParallelExperts vs the single-process RoutedExperts, a whole
sharded DeepSeekV3 vs the unsharded model on all ranks' batches, ExpertShard. Multi-rank cases run in spawned gloo
workers on 127.0.0.1 (world 2 and 4); each rank gets different tokens (EP is carved out of DP)."""
from __future__ import annotations

import copy
import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raymoe.config import ModelConfig
from raymoe.experts import (
    ExpertParallelExperts,
    ExpertShard,
    expert_range,
    moe_layers,
    shard_experts,
    source_to_expert_major,
)
from raymoe.model import DeepSeekV3
from raymoe.model.moe import RoutedExperts, set_expert_impl

E, D, I, K = 8, 32, 16, 2
SPAWN_TIMEOUT_S = 120


# ----------------------------------------------------------------------------------------------- helpers (any process)
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (0 for two empty tensors)."""
    if b.numel() == 0:
        return 0.0
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    r = _rel(a, b)
    assert r <= tol, f"{what}: relative error {r:.3g} > {tol}"


def _experts(seed: int = 0) -> RoutedExperts:
    torch.manual_seed(seed)
    ex = RoutedExperts(E, D, I)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0.0, 0.2)
    return ex


def _tokens(rank: int, world: int, case: str, gid: int = 0) -> tuple[torch.Tensor, ...]:
    """Ep rank ``rank`` of ep group ``gid``: ``x [T, D]``, global ``topk_idx [T, K]`` (distinct per token),
    gates ``[T, K]``, upstream grad ``[T, D]``."""
    g = torch.Generator().manual_seed(1000 * world + 100 * gid + rank)
    T = 6 + 3 * rank
    lo, hi = 0, E  # experts this rank's tokens may pick
    if case == "all_to_rank0":  # every token of every rank goes to rank 0's experts: the others receive nothing
        hi = E // world
    elif case == "empty":  # rank 1 has no tokens; rank 0 only sends to the last rank's experts
        if rank == 1:
            T = 0
        if rank == 0:
            lo = E - E // world
    elif case == "own":  # even ranks keep their tokens on their own experts: zero rows from some sources
        if rank % 2 == 0:
            lo, hi = expert_range(E, rank, world).start, expert_range(E, rank, world).stop
    x = torch.randn(T, D, generator=g)
    idx = lo + torch.rand(T, hi - lo, generator=g).topk(K, dim=-1).indices
    w = torch.rand(T, K, generator=g)
    gy = torch.randn(T, D, generator=g)
    return x, idx, w, gy


def _tiny_cfg() -> ModelConfig:
    return ModelConfig.preset("tiny").replace(seq_aux_loss_alpha=1e-3, vocab_size=512)


def _batch(rank: int, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + rank)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    return ids, labels


# ----------------------------------------------------------------------------------------------- worker cases
# ``rank``/``world`` below are the ep rank and ep size; ``group`` the ep group; ``members`` its global ranks.
def _case_experts(rank: int, world: int, group, members: list[int], case: str) -> None:
    gid = members[0] // world
    dt = torch.bfloat16 if case == "bf16" else torch.float32  # bf16: CPU row bucketing on the local experts
    tol, wtol = (2e-2, 3e-2) if case == "bf16" else (1e-6, 2e-6)  # fp32 weight grads: summed in another order
    full = _experts().to(dt)
    ep = ExpertParallelExperts(full, rank, world, group)
    assert ep.expert_ids == list(expert_range(E, rank, world)) and ep.gate_proj.shape == (E // world, D, I)
    x, idx, w, gy = _tokens(rank, world, case, gid)
    x, gy = x.to(dt), gy.to(dt)
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = ep(x, idx, w)
    (y * gy).sum().backward()

    # reference: the full layer (same weights) applied to each rank's tokens; weight grads summed over ranks
    ref = copy.deepcopy(full)
    for s in range(world):
        xs, idxs, ws, gys = _tokens(s, world, case, gid)
        xs, gys = xs.to(dt), gys.to(dt)
        if xs.shape[0] == 0:
            continue
        xs.requires_grad_(True)
        ws.requires_grad_(True)
        ys = ref(xs, idxs, ws)
        (ys * gys).sum().backward()
        if s == rank:
            _close(y, ys.detach(), tol, f"{case} rank {rank} output")
            _close(x.grad, xs.grad, tol, f"{case} rank {rank} input grad")
            _close(w.grad, ws.grad, tol, f"{case} rank {rank} gate grad")
    if x.shape[0] == 0:
        assert y.shape == (0, D) and x.grad.shape == (0, D) and w.grad.shape == (0, K)
    sl = ep.expert_slice
    for name in ("gate_proj", "up_proj", "down_proj"):
        got, want = getattr(ep, name).grad, getattr(ref, name).grad[sl]
        assert got is not None, f"{case} rank {rank}: no grad for {name}"
        if want.abs().max() == 0:  # nobody routed to this rank's experts
            assert got.abs().max() == 0
        else:
            _close(got.float(), want.float(), wtol, f"{case} rank {rank} {name} grad")


def _case_model(rank: int, world: int, group, members: list[int]) -> None:
    cfg = _tiny_cfg()
    torch.manual_seed(0)
    model = DeepSeekV3(cfg)
    ref = copy.deepcopy(model)
    full_sd = {k: v.clone() for k, v in ref.state_dict().items()}
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    total = sum(p.numel() for p in model.parameters())

    shard_experts(model, rank, world, group)
    layers = moe_layers(model)
    assert sorted(layers) == [1, 2, 3]  # two main MoE layers + the MTP block (layer_idx = N + 0)
    for mlp in layers.values():
        assert isinstance(mlp.experts, ExpertParallelExperts)
        assert mlp.experts.gate_proj.shape[0] == mlp.experts.down_proj.shape[0] == E // world
    local = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert local * world == routed
    assert sum(p.numel() for p in model.parameters()) == total - routed + routed // world
    # same state-dict keys as the full model; expert tensors are the full ones' rows [r·E/ep, (r+1)·E/ep)
    sd = model.state_dict()
    assert sd.keys() == full_sd.keys()
    sl = slice(rank * E // world, (rank + 1) * E // world)
    for k, v in sd.items():
        want = full_sd[k][sl] if ".mlp.experts." in k else full_sd[k]
        assert torch.equal(v, want), k
    # ExpertShard: over the same objects (training) / from the full state dict (serving) — same weights
    shard = ExpertShard.from_model(model, rank, world)
    assert shard.layer_ids == [1, 2, 3] and all(shard.layer(i) is layers[i].experts for i in layers)
    served = ExpertShard.from_state_dict(full_sd, cfg, rank, world)
    msd = served.model_state_dict()
    assert msd.keys() == shard.model_state_dict().keys()
    assert all(torch.equal(v, sd[k]) for k, v in msd.items())

    ids, labels = _batch(members[rank], cfg)  # each rank its own batch
    out = model(ids, labels)
    out.loss.backward()

    ref_outs = []
    for s in members:
        ref_outs.append(ref(*_batch(s, cfg)))
    torch.stack([o.loss for o in ref_outs]).sum().backward()
    _close(out.loss.detach(), ref_outs[rank].loss.detach(), 1e-5, f"rank {rank} loss")
    assert torch.equal(out.expert_counts, ref_outs[rank].expert_counts)  # routing unchanged, global ids

    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        want = ref_params[name].grad
        if ".mlp.experts." in name:  # already summed over all ranks' tokens by the backward exchange
            _close(p.grad, want[sl], 1e-5, f"rank {rank} {name}")
        else:
            g = p.grad.clone()
            dist.all_reduce(g, group=group)
            _close(g, want, 1e-5, f"rank {rank} {name}")

    # the expert back-end stays selectable on the sharded model (other back-end, same forward)
    set_expert_impl(model, "loop")
    assert all(m.experts.impl == "loop" for m in layers.values())
    with torch.no_grad():
        _close(model(ids, labels).loss, out.loss.detach(), 1e-5, f"rank {rank} loss (loop)")


def _case_recompute(rank: int, world: int, group, members: list[int]) -> None:
    """train.recompute under EP: a full-recompute block repeats its all-to-alls inside backward (on every rank, in
    the same order); selective recomputes norms and MLA up-projections. Loss, routing and gradients equal no
    recompute (same kernels: 1e-6 relative)."""
    from raymoe.model.recompute import set_recompute

    cfg = _tiny_cfg()
    got = {}
    for mode in ("none", "full", "selective"):
        torch.manual_seed(0)
        model = shard_experts(DeepSeekV3(cfg), rank, world, group)
        set_recompute(model, mode)
        out = model(*_batch(members[rank], cfg))
        out.loss.backward()
        got[mode] = (out.loss.detach(), out.expert_counts, {n: p.grad for n, p in model.named_parameters()})
    loss, counts, grads = got["none"]
    for mode in ("full", "selective"):
        assert torch.equal(got[mode][0], loss) and torch.equal(got[mode][1], counts), (mode, rank)
        for n, g in grads.items():
            _close(got[mode][2][n], g, 1e-6, f"rank {rank} recompute={mode} {n}")


def _worker(rank: int, world: int, port: int, plan: list[tuple[int, list[str]]]) -> None:
    """Runs each ``(ep, cases)`` of ``plan``: the world is cut into ``world/ep`` ep groups of consecutive ranks (EP
    carved out of DP: the groups run side by side, each on its own tokens)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=SPAWN_TIMEOUT_S))
    try:
        for ep, cases in plan:
            groups = [list(range(g, g + ep)) for g in range(0, world, ep)]
            handles = [None] if ep == world else [dist.new_group(m) for m in groups]  # every rank makes every group
            members = groups[rank // ep]
            group = handles[0] if ep == world else handles[rank // ep]
            for case in cases:
                if case == "model":
                    _case_model(rank % ep, ep, group, members)
                elif case == "recompute":
                    _case_recompute(rank % ep, ep, group, members)
                else:
                    _case_experts(rank % ep, ep, group, members, case)
                dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, plan: list[tuple[int, list[str]]]) -> None:
    ctx = mp.start_processes(_worker, args=(world, _free_port(), plan), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"EP workers (world {world}) did not finish within {SPAWN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


# ----------------------------------------------------------------------------------------------- tests
def test_expert_parallel_matches_single_process() -> None:
    """One spawn of 4 gloo ranks (spawning is the slow part): ep = 4 over the whole world, then ep = 2 in two
    side-by-side ep groups {0, 1} and {2, 3} (non-default process groups). Cases: random routing, skewed (all to ep
    rank 0's experts: the others receive nothing), zero rows from some sources, T = 0 on a rank; with ep = 2 also
    bf16 (CPU row bucketing), a whole model, and a whole model under each train.recompute mode."""
    edge = ["random", "all_to_rank0", "own", "empty"]
    _spawn(4, [(4, edge), (2, edge + ["bf16", "model", "recompute"])])


def test_source_to_expert_major_permutation() -> None:
    counts = torch.tensor([[2, 0, 1], [0, 0, 3], [1, 2, 0]])  # [source, local expert]
    src_major = [(s, e) for s in range(3) for e in range(3) for _ in range(int(counts[s, e]))]
    to_expert, to_source = source_to_expert_major(counts)
    expert_major = [src_major[i] for i in to_expert.tolist()]
    assert expert_major == sorted(src_major, key=lambda se: (se[1], se[0]))
    assert torch.equal(to_expert[to_source], torch.arange(len(src_major)))
    e0, e1 = source_to_expert_major(torch.zeros(2, 4, dtype=torch.long))
    assert e0.numel() == e1.numel() == 0


def test_single_rank_and_local_slice_construction() -> None:
    full = _experts()
    x, idx, w, _ = _tokens(0, 1, "random")
    one = ExpertParallelExperts(full, 0, 1)  # ep = 1: no collectives, the full layer itself
    assert one.gate_proj is full.gate_proj
    torch.testing.assert_close(one(x, idx, w), full(x, idx, w), rtol=0, atol=0)
    # from the local slice: Parameters adopted, not copied (so an ExpertShard and the model share them)
    local = full.shard([4, 5, 6, 7])
    ep = ExpertParallelExperts(local, 1, 2, num_experts=E)
    assert ep.gate_proj is local.gate_proj and ep.expert_ids == [4, 5, 6, 7] and ep.expert_slice == slice(4, 8)
    with pytest.raises(ValueError):
        ExpertParallelExperts(local, 0, 2, num_experts=E)  # holds rank 1's experts
    with pytest.raises(ValueError):
        ExpertParallelExperts(full, 0, 3)  # 8 experts over 3 ranks


def test_expert_shard_serves_grouped_rows_and_fp8_hook() -> None:
    cfg = _tiny_cfg().replace(num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = DeepSeekV3(cfg)
    full = model.layers[1].mlp.experts
    shard = ExpertShard.from_state_dict(model.state_dict(), cfg, 1, 2)
    assert shard.layer_ids == [1, 2] and shard.expert_ids == [4, 5, 6, 7]
    counts = torch.tensor([3, 0, 2, 1])
    x = torch.randn(int(counts.sum()), cfg.hidden_size)
    want = full.forward_grouped(x, torch.cat([torch.zeros(4, dtype=torch.long), counts]))
    torch.testing.assert_close(shard(1, x, counts), want, rtol=1e-6, atol=1e-6)
    # shard_experts can adopt the shard's Parameters; convert_to_fp8 finds the EP experts (they are RoutedExperts)
    shard_experts(model, 1, 2, shard=shard)
    assert model.layers[1].mlp.experts.gate_proj is shard.layer(1).gate_proj
    fp8 = pytest.importorskip("raymoe.fp8")
    fp8.convert_to_fp8(model)
    assert all(m.experts.fp8 is not None for m in moe_layers(model).values())
