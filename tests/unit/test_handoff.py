"""Hand-off pieces without Ray (:mod:`raymoe.train.handoff`): which replicas survive a failure, a rank's state as
named tensors (round trip, and the next optimizer step equal), and the broadcast between two spawned gloo ranks."""
from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raymoe.config import ElasticConfig, ModelConfig, ParallelConfig, RunConfig
from raymoe.optim import GuardedAdamW
from raymoe.train.handoff import (broadcast_state, handoff_unavailable, load_rank_state, pick_survivors, probe_of,
                                  rank_state, replica_ranks)
from raymoe.train.parallelize import build_model


def _p(step, result=None):
    return probe_of(step, result)


def test_replica_ranks_follow_the_topology_numbering() -> None:
    from raymoe.train.topology import Topology

    topo = Topology(2, 2, 3, "1f1b", 6, ModelConfig.preset("tiny"))
    for d in range(3):
        assert replica_ranks(2, 2, 3, d) == list(topo.model_group(topo.rank_of(0, 0, d)))


def test_pick_survivors() -> None:
    # pp=2 x dp=2: replica d = ranks (d, 2 + d); replica 1's rank 3 died
    s = pick_survivors(2, 1, 2, [_p(4), _p(4), _p(4), None], in_flight=5)
    assert (s.replicas, s.lost, s.completed_in_flight, s.results) == ([0], [1], False, None)
    # the survivors had applied the step in flight (the dead rank died after its last collective): it counts
    s = pick_survivors(2, 1, 2, [_p(5, "r0"), None, _p(5, "r2"), _p(5, "r3")], in_flight=5)
    assert (s.replicas, s.completed_in_flight, s.results) == ([0], True, ["r0", "r2"])
    # replicas in different states: the newer one is kept, the other replaced from it
    s = pick_survivors(1, 1, 3, [_p(4), _p(5, "a"), None], in_flight=5)
    assert (s.replicas, s.lost, s.results) == ([1], [0, 2], ["a"])
    # ranks of one replica disagree: that replica is not a consistent copy
    s = pick_survivors(2, 1, 2, [_p(5), _p(4), _p(4), _p(4)], in_flight=5)
    assert (s.replicas, s.lost, s.completed_in_flight) == ([1], [0], False)
    # outside a step (evaluate, save): nothing is "in flight"; ranks never stepped report None, same as each other
    s = pick_survivors(1, 1, 2, [_p(None), _p(None)], in_flight=None)
    assert (s.replicas, s.completed_in_flight) == ([0, 1], False)
    s = pick_survivors(1, 2, 2, [_p(3), None, None, _p(3)], in_flight=4)  # ep=2: replica d = ranks (d, 2 + d)
    assert s.replicas == [] and s.lost == [0, 1] and "no DP replica survived whole" in s.why


def test_handoff_unavailable_names_the_reason() -> None:
    run = RunConfig()
    assert handoff_unavailable(run, "native") is None  # dp = ep = 1: nothing sharded
    assert "ZeRO-1" in handoff_unavailable(run, "deepspeed")
    for sharded in (RunConfig(parallel=ParallelConfig(dp=2)), RunConfig(parallel=ParallelConfig(ep=2)),
                    RunConfig(elastic=ElasticConfig(min_dp=1, max_dp=2))):  # native ZeRO-1 (the default) shards
        assert "parallel.zero_stage=1" in handoff_unavailable(sharded, "native")
    assert handoff_unavailable(RunConfig(parallel=ParallelConfig(dp=2, zero_stage=0)), "native") is None
    off = RunConfig(elastic=ElasticConfig(recovery="checkpoint"))
    assert handoff_unavailable(off, "native") == "elastic.recovery=checkpoint"
    with pytest.raises(Exception, match="elastic.recovery='disk'; allowed: handoff, checkpoint"):
        ElasticConfig(recovery="disk")


def _trained(seed: int) -> tuple[torch.nn.Module, GuardedAdamW]:
    model = build_model(ModelConfig.preset("tiny"), seed)
    opt = GuardedAdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
    for _ in range(2):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def _one_step(model, opt) -> None:
    x = (torch.arange(32).view(2, 16) * 7) % 64
    model(x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_rank_state_round_trip_and_the_next_step_is_equal() -> None:
    src, src_opt = _trained(0)
    state = rank_state(src, src_opt)
    assert any(k.startswith("optim/exp_avg_sq/") for k in state) and any(k.startswith("optim/step/") for k in state)
    dst = build_model(ModelConfig.preset("tiny"), 1)  # other initial values, no optimizer state yet
    dst_opt = GuardedAdamW(dst.parameters(), lr=1e-2)
    load_rank_state(dst, dst_opt, {k: v.clone() for k, v in state.items()})
    got = rank_state(dst, dst_opt)
    assert sorted(got) == sorted(state)
    assert all(torch.equal(got[k], state[k]) for k in state)
    _one_step(src, src_opt)
    _one_step(dst, dst_opt)  # bias-corrected AdamW: a wrong step count or moment would change the update
    for (n, a), b in zip(src.named_parameters(), dst.parameters()):
        assert torch.equal(a, b), n


def _bcast_worker(rank: int, port: int, q) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    try:
        g = dist.new_group([0, 2])  # rank 1 is not a member and calls nothing
        if rank == 1:
            return
        state = None
        if rank == 2:
            state = {"a": torch.arange(10, dtype=torch.float32).view(2, 5), "b": torch.tensor(7),
                     "c": torch.ones(3, 4, dtype=torch.bfloat16), "d": torch.arange(300, dtype=torch.float32)}
        got = broadcast_state(state, 2, g, torch.device("cpu"), bucket_bytes=512)  # 'd' alone exceeds a bucket
        if rank == 0:
            q.put({k: v.clone() for k, v in got.items()})
    finally:
        dist.destroy_process_group()


def test_broadcast_state_between_processes() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_bcast_worker, args=(r, port, q)) for r in range(3)]
    for p in procs:
        p.start()
    try:
        got = q.get(timeout=120)
        deadline = time.monotonic() + 60
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert sorted(got) == ["a", "b", "c", "d"]
    assert torch.equal(got["a"], torch.arange(10, dtype=torch.float32).view(2, 5))
    assert got["b"].dtype == torch.int64 and got["b"].shape == () and int(got["b"]) == 7
    assert got["c"].dtype == torch.bfloat16 and torch.equal(got["c"], torch.ones(3, 4, dtype=torch.bfloat16))
    assert torch.equal(got["d"], torch.arange(300, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------- pipeline workers
def _pp2_run(tmp: str):
    from raymoe.config import DataConfig, LoggerConfig, ParallelConfig, TrainConfig

    # zero_stage=0: a hand-off needs the optimizer state replicated over DP (ZeRO-1 shards it)
    return RunConfig(model=ModelConfig.preset("tiny"),
                     parallel=ParallelConfig(pp=2, dp=2, dp_impl="native", zero_stage=0),
                     train=TrainConfig(steps=4, micro_batch_size=2, num_microbatches=2, warmup_tokens=0, seed=0,
                                       export_hf=False),
                     data=DataConfig(seq_len=32), logger=LoggerConfig(kind="none"), run_dir=tmp)


def _plans(run, step: int) -> list:
    from raymoe.train.plans import StepPlan
    from raymoe.train.worker import topology_of

    topo, tc = topology_of(run), run.train
    n = topo.data_parallel_size * tc.num_microbatches * tc.micro_batch_size
    ids = list(range(step * n, (step + 1) * n))
    bias = torch.zeros(run.model.num_router_layers, run.model.n_routed_experts)
    return [StepPlan(step=step, lr=1e-3, mtp_lambda=tc.mtp_lambda, biases=bias,
                     microbatches=tuple(tuple(m) for m in topo.microbatches(r, ids, tc.micro_batch_size)),
                     ops=tuple(str(o) for o in topo.schedule.ops(topo.coords(r).pp_rank)))
            for r in range(topo.world_size)]


def _pp2_worker(rank: int, tmp: str, ports: list[int], q) -> None:
    import hashlib

    from raymoe.train.worker import PipelineWorker

    run = _pp2_run(tmp)
    w = PipelineWorker(run, rank, "127.0.0.1", ports[0], threads=1, timeout_s=120)
    for step in range(2):
        w.step(_plans(run, step)[rank])
    survivor = rank % 2 == 0  # replica 0 = ranks 0 (pp 0) and 2 (pp 1); replica 1 is replaced by fresh workers
    if survivor:
        w.reform(run, rank, "127.0.0.1", ports[1])
    else:
        w.close()
        w = PipelineWorker(run, rank, "127.0.0.1", ports[1], threads=1, timeout_s=120)
    nbytes = w.handoff()
    digest = hashlib.sha256()
    for k, t in sorted(rank_state(w.model, w.optimizer).items()):
        digest.update(k.encode())
        digest.update(t.detach().float().contiguous().numpy().tobytes())
    res = w.step(_plans(run, 2)[rank])  # the re-formed group trains: P2P, all-to-all-free pp=2, DP reduction
    w.close()
    ref = PipelineWorker(run, rank, "127.0.0.1", ports[2], threads=1, timeout_s=120)  # the uninterrupted run
    for step in range(3):
        ref_res = ref.step(_plans(run, step)[rank])
    ref.close()
    q.put((rank, digest.hexdigest(), nbytes, w.completed_step, res.losses.loss, res.grad_norm,
           ref_res.losses.loss, ref_res.grad_norm))


def test_pipeline_workers_reform_and_hand_off_at_pp2(tmp_path) -> None:
    """pp=2 × dp=2 PipelineWorkers in four gloo processes, two steps; then replica 0 re-forms (new process group,
    same state) and replica 1 is rebuilt from scratch and receives replica 0's state by broadcast: afterwards both
    replicas hold bit-identical state (optimizer moments and step counter included) and a further step gives the
    same loss and gradient norm on every rank as the uninterrupted run's."""
    from raymoe.data import prepare_data

    run = _pp2_run(str(tmp_path))
    prepare_data(run, progress=False)
    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_pp2_worker, args=(r, str(tmp_path), ports, q)) for r in range(4)]
    for p in procs:
        p.start()
    try:
        got = {}
        for _ in range(4):
            r, *rest = q.get(timeout=300)
            got[r] = rest
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    # state of pp rank 0 on ranks 0 and 1, of pp rank 1 on ranks 2 and 3
    assert got[0][0] == got[1][0] and got[2][0] == got[3][0] and got[0][0] != got[2][0]
    assert got[1][1] == got[0][1] > 1_000_000 and got[3][1] == got[2][1] > 0  # bytes broadcast = received
    assert all(g[2] == 2 for g in got.values())  # the step after the hand-off is the third (index 2) everywhere
    assert len({g[3] for g in got.values()}) == 1 and len({g[4] for g in got.values()}) == 1
    # equal to the uninterrupted run's third step (same arithmetic: fp32, same reduction order)
    loss, norm, ref_loss, ref_norm = got[0][3], got[0][4], got[0][5], got[0][6]
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss) and abs(norm - ref_norm) <= 1e-6 * abs(ref_norm)
