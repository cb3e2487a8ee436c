"""P2PTransport over gloo (torch.distributed, one process per rank from a forkserver, no Ray).

* pipeline equivalence: every process builds the same tiny DeepSeek-V3, runs a StageRunner over its rank's stage
  chunks with the transport, gradients are summed over the ranks hosting each parameter (the DualPipe pair
  all-reduce, the tied embedding), and losses/gradients must match single-process ``reference_step``;
* overlap: sends return at once and travel while the sender computes, receives are prefetched while the receiver
  computes, and a sender does not wait for a late receiver (total ~ max(compute, delay), not the sum);
* timeout and thread errors surface as P2PTimeout / P2PError (no hang);
* two channels between the same pair, interleaved in different orders on the two sides, in both directions at
  once, with assorted dtypes/shapes, do not mix.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import time
from collections import defaultdict
from datetime import timedelta
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from raymoe.schedule import StageRunner, build, reference_step, swap_linears
from raymoe.train.p2p import P2PError, P2PTimeout, P2PTransport, expected_recvs

SPAWN_TIMEOUT_S = 75.0


# ----------------------------------------------------------------------------------------------------------------
# process plumbing
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, scenario: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        result = SCENARIOS[scenario](rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(scenario: str, world: int, *args: Any, timeout: float = SPAWN_TIMEOUT_S) -> list[Any]:
    """Run ``SCENARIOS[scenario](rank, world, *args)`` in ``world`` processes; their return values, by rank.

    Safe like ``spawn`` (the workers inherit no state or threads from pytest: they are forked from a clean server
    process), but the forkserver imports torch and raymoe once for all tests instead of once per process (seconds
    each on a busy machine). A hang fails the test after ``timeout`` seconds and the workers are killed.
    """
    mp.set_forkserver_preload(["torch", "torch.distributed", "raymoe.schedule", "raymoe.model", "raymoe.train.p2p"])
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(_entry, args=(world, _free_port(), d, scenario, args), nprocs=world, join=False,
                                 start_method="forkserver")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=0.5):  # raises with the worker's traceback if one fails
                if time.monotonic() > deadline:
                    pytest.fail(f"{scenario}: workers still running after {timeout:.0f}s (hang)")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _link_groups(world: int) -> dict[frozenset, dist.ProcessGroup]:
    """One dedicated 2-rank group per neighbour pair (every rank creates all of them, in the same order)."""
    return {frozenset((a, a + 1)): dist.new_group([a, a + 1]) for a in range(world - 1)}


def _transport(rank: int, world: int, **kw: Any) -> P2PTransport:
    groups = _link_groups(world)
    return P2PTransport(rank, {r: r for r in range(world)}, lambda peer: groups[frozenset((rank, peer))], **kw)


# ----------------------------------------------------------------------------------------------------------------
# pipeline equivalence on the tiny model
def _tiny() -> tuple[Any, nn.Module]:
    from raymoe.config import ModelConfig
    from raymoe.model import DeepSeekV3
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    return cfg, swap_linears(DeepSeekV3(cfg))


def _ids(cfg: Any, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, cfg.vocab_size, (1, 16), generator=g) for _ in range(n)]


def _side_inputs(ids: list[torch.Tensor], num_stages: int) -> Callable[[int, int], dict]:
    return lambda stage, mb: {"input_ids": ids[mb], "labels": ids[mb]} if stage == num_stages - 1 else {}


def _loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    return out.loss


def _pipeline(rank: int, world: int, cases: list[tuple[str, int]]) -> dict:
    tp = _transport(rank, world, timeout_s=60)
    sync_groups: dict[tuple, dist.ProcessGroup] = {}
    out = {}
    for name, mbs in cases:
        sched = build(name, world, mbs)
        S = sched.num_stages
        cfg, model = _tiny()
        stages, ids = model.stages(S), _ids(cfg, mbs)
        chunks = {k: stages[k[0]] for k in sched.chunks(rank)}  # this process's model is this rank's copy
        runner = StageRunner(sched, rank, chunks, tp, _loss, chunk_kwargs=_side_inputs(ids, S))
        t0 = time.perf_counter()
        tp.reset_stats()
        tp.expect(expected_recvs(sched, rank))
        runner.start_step(dict(enumerate(ids)), dict(enumerate(ids)))
        while not runner.done:
            runner.run_next()
        losses = runner.finish_step()
        stats = tp.finish_step()
        step_s = time.perf_counter() - t0
        # sum every parameter's grads over the ranks hosting it: the DualPipe pair {r, PP-1-r}; the embedding
        # shared by stage 0 and the last stage's MTP when those live on different ranks (1F1B, ZB1P)
        name_of = {id(p): n for n, p in model.named_parameters()}
        params = dict(model.named_parameters())
        hosts: dict[str, set[int]] = defaultdict(set)
        for r in range(world):
            for s, _ in sched.chunks(r):
                for p in stages[s].parameters():
                    hosts[name_of[id(p)]].add(r)
        for rs in sorted({tuple(sorted(v)) for v in hosts.values() if len(v) > 1}):
            if rs not in sync_groups:
                sync_groups[rs] = dist.new_group(list(rs))
        mine = sorted(n for n, rs in hosts.items() if rank in rs)
        for rs, group in sync_groups.items():
            if rank not in rs:
                continue
            shared = [params[n] for n in mine if tuple(sorted(hosts[n])) == rs]
            if not shared:
                continue
            for p in shared:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in shared])
            dist.all_reduce(flat, group=group)  # one bucket per group, as a real grad all-reduce would
            for p, g in zip(shared, flat.split([p.numel() for p in shared])):
                p.grad.copy_(g.view_as(p))
        out[(name, world, mbs)] = {
            "losses": {m: v.clone() for m, v in losses.items()},
            "grads": {n: params[n].grad.clone() for n in mine if params[n].grad is not None},
            "hosted": mine, "stats": dataclasses.asdict(stats), "step_s": step_s,
        }
    tp.close()
    return out


def _check_pipeline(results: list[dict]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers; the grouped GEMMs crawl with contended OpenMP threads
    try:
        _compare_with_reference(results)
    finally:
        torch.set_num_threads(threads)


def _compare_with_reference(results: list[dict]) -> None:
    refs: dict[tuple[int, int], tuple[list[torch.Tensor], dict[str, torch.Tensor]]] = {}
    for key in results[0]:
        name, world, mbs = key
        S = build(name, world, mbs).num_stages
        if (S, mbs) not in refs:
            cfg, model = _tiny()
            ids = _ids(cfg, mbs)
            want = reference_step(model.stages(S), _loss, ids, ids, _side_inputs(ids, S))
            refs[(S, mbs)] = (want, {n: p.grad for n, p in model.named_parameters()})
        want, ref_grads = refs[(S, mbs)]
        got: dict[int, torch.Tensor] = {}
        for res in results:
            got.update(res[key]["losses"])
        assert sorted(got) == list(range(mbs)), (key, sorted(got))
        for m in range(mbs):
            torch.testing.assert_close(got[m], want[m], rtol=1e-6, atol=0, msg=f"{key}: loss of micro-batch {m}")
        hosted: set[str] = set()
        for rank, res in enumerate(results):
            hosted |= set(res[key]["hosted"])
            for n, g in res[key]["grads"].items():
                r = ref_grads[n] if ref_grads[n] is not None else torch.zeros_like(g)
                err = float((g.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30))
                assert err <= 1e-5 or float((g - r).abs().max()) == 0, f"{key} rank {rank} {n}: rel err {err:.2e}"
            for n in set(res[key]["hosted"]) - set(res[key]["grads"]):
                assert ref_grads[n] is None or not ref_grads[n].any(), f"{key} rank {rank} {n}: grad missing"
        missing = {n for n, g in ref_grads.items() if g is not None} - hosted
        assert not missing, f"{key}: parameters with gradients hosted nowhere: {sorted(missing)}"
        sent = sum(res[key]["stats"]["msgs_sent"] for res in results)
        assert sent == sum(res[key]["stats"]["msgs_received"] for res in results) > 0


def test_pipeline_pp2_matches_reference_step():
    cases = [("1f1b", 4), ("zb1p", 4), ("dualpipe", 4), ("dualpipev", 4)]
    results = spawn("pipeline", 2, cases)
    _check_pipeline(results)


def test_pipeline_dualpipe_pp4_matches_reference_step():
    results = spawn("pipeline", 4, [("dualpipe", 8)])
    _check_pipeline(results)


# ----------------------------------------------------------------------------------------------------------------
# overlap
N_MSG, MSG_SHAPE = 8, (256, 1024)  # 1 MiB fp32 each
C1, D1 = 1.8, 0.8   # part 1: sender computes C1 after its sends; receiver computes D1 < C1 before receiving
C2, D2 = 1.2, 1.2   # part 2: sender computes C2; receiver arms only after D2 (not receiving at all until then)


def _compute(seconds: float) -> None:
    """Busy torch work of the given length (the GIL is released inside each op, as in a stage's kernels)."""
    a = torch.randn(96, 96)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a) * 0.5


def _msg(i: int) -> torch.Tensor:
    return torch.full(MSG_SHAPE, float(i))


def _overlap(rank: int, world: int) -> dict:
    tp = _transport(rank, world, timeout_s=30)
    ch1, late, ch2 = (0, 1, "F", 1, 0), (0, 1, "F", 2, 0), (0, 1, "B", 1, 1)
    xs = [_msg(i) for i in range(N_MSG)]
    res: dict[str, Any] = {}
    # part 1
    if rank == 1:
        tp.expect([(ch1, i) for i in range(N_MSG)] + [(late, 0)])
    dist.barrier()
    t0 = time.perf_counter()
    if rank == 0:
        for i, x in enumerate(xs):
            tp.send(ch1, i, x)
        res["send_s"] = time.perf_counter() - t0
        _compute(C1)
        tp.send(late, 0, xs[0])
        tp.finish_step()
        res["total_s"] = time.perf_counter() - t0
    else:
        _compute(D1)
        res["arrived_before_recv"] = tp.stats().msgs_received
        res["polled"] = [tp.poll(ch1, i) for i in range(N_MSG)]
        t1 = time.perf_counter()
        res["ok"] = all(torch.equal(tp.recv(ch1, i), xs[i]) for i in range(N_MSG))
        res["prefetched_recv_s"] = time.perf_counter() - t1
        before = tp.stats().recv_wait_s
        t2 = time.perf_counter()
        tp.recv(late, 0)
        res["late_wait_s"] = time.perf_counter() - t2
        res["late_wait_counted_s"] = tp.stats().recv_wait_s - before
        tp.finish_step()
    # part 2
    dist.barrier()
    t0 = time.perf_counter()
    if rank == 0:
        for i, x in enumerate(xs):
            tp.send(ch2, i, x)
        res["send2_s"] = time.perf_counter() - t0
        _compute(C2)
        tp.finish_step()
        res["total2_s"] = time.perf_counter() - t0
    else:
        time.sleep(D2)  # busy elsewhere: no receiver is armed for these messages yet
        tp.expect([(ch2, i) for i in range(N_MSG)])
        res["ok2"] = all(torch.equal(tp.recv(ch2, i), xs[i]) for i in range(N_MSG))
        tp.finish_step()
    res["stats"] = dataclasses.asdict(tp.stats())
    tp.close()
    return res


def test_communication_overlaps_compute():
    r0, r1 = spawn("overlap", 2)
    # sends return at once (a blocking gloo send would wait for the receiver) ...
    assert r0["send_s"] < 0.3, r0
    assert r0["send2_s"] < 0.3, r0  # ... even while nobody is receiving (gloo blocks until a receive is posted)
    # part 1: the data travelled while rank 0 was still computing (rank 1 looked at D1 < C1) and was prefetched
    # while rank 1 computed: its receives return without waiting
    assert r1["arrived_before_recv"] == N_MSG and all(r1["polled"]), r1
    assert r1["ok"] and r1["prefetched_recv_s"] < 0.2, r1
    # a receive of data sent only after rank 0's compute waits ~C1 - D1, and that idle time is counted
    assert 0.5 * (C1 - D1) < r1["late_wait_s"] < C1 - D1 + 1.0, r1
    assert abs(r1["late_wait_counted_s"] - r1["late_wait_s"]) < 0.1, r1
    assert r0["total_s"] < C1 + 0.6, r0
    # part 2: the sender's step takes ~max(C2, D2), not C2 + D2 (sends serialised behind a late receiver)
    assert r1["ok2"], r1
    assert r0["total2_s"] < C2 + D2 - 0.6, r0
    assert r0["stats"]["msgs_sent"] == r1["stats"]["msgs_received"] == 2 * N_MSG + 1
    assert r0["stats"]["bytes_sent"] == r1["stats"]["bytes_received"] == (2 * N_MSG + 1) * 4 * 256 * 1024


# ----------------------------------------------------------------------------------------------------------------
# timeouts and errors
def _timeouts(rank: int, world: int) -> dict:
    tp = _transport(rank, world, timeout_s=0.5)
    ch = (0, 1, "F", 1, 0)
    res: dict[str, Any] = {}
    if rank == 1:
        tp.expect([(ch, 3)])
        t0 = time.perf_counter()
        try:
            tp.recv(ch, 3)
        except P2PTimeout as e:
            res["timeout"] = (str(e), time.perf_counter() - t0, isinstance(e, RuntimeError))
        try:
            tp.recv(ch, 99)
        except P2PError as e:
            res["unannounced"] = str(e)
    dist.barrier()  # now rank 0 sends the late message; it is still delivered
    if rank == 0:
        tp.send(ch, 3, torch.ones(2))
        tp.finish_step()
    else:
        tp.timeout_s = 30.0
        res["late"] = tp.recv(ch, 3).tolist()
        tp.finish_step()
    # a thread error (an unannounced message) surfaces in the caller instead of a hang
    if rank == 1:
        tp.expect([(ch, 4)])
    dist.barrier()
    if rank == 0:
        tp.send(ch, 5, torch.ones(3))
        tp.finish_step()  # delivered: the receiver drains the payload before it complains
    else:
        t0 = time.perf_counter()
        try:
            tp.recv(ch, 4)
        except P2PError as e:
            res["thread_error"] = (type(e).__name__, str(e), time.perf_counter() - t0)
        try:
            tp.send((1, 0, "B", 0, 0), 0, torch.ones(1))
        except P2PError as e:
            res["after_error"] = str(e)
    tp.close()
    return res


def test_timeout_and_thread_errors_surface():
    _, r1 = spawn("timeouts", 2)
    msg, elapsed, is_runtime = r1["timeout"]
    assert is_runtime and 0.45 <= elapsed < 3.0, r1
    for part in ("rank 1", "peer rank 0", "(0, 1, 'F', 1, 0)", "micro-batch 3"):
        assert part in msg, (part, msg)
    assert "not announced" in r1["unannounced"], r1
    assert r1["late"] == [1.0, 1.0], r1
    name, msg, elapsed = r1["thread_error"]
    assert name == "P2PError" and "unexpected message" in msg and "micro-batch 5" in msg and elapsed < 0.45, r1
    assert "unexpected message" in r1["after_error"], r1


# ----------------------------------------------------------------------------------------------------------------
# channels between the same pair do not mix
def _payload(tag: str, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(ord(tag) * 100 + i)
    kinds = [
        lambda: torch.randn(i + 1, 3, generator=g),
        lambda: torch.arange(5, dtype=torch.int64) + 1000 * i,
        lambda: torch.tensor(7.5 + i, dtype=torch.bfloat16),                    # 0-dim bf16
        lambda: torch.rand(4, generator=g) > 0.5,                               # bool
        lambda: torch.randn(2, 3, 4, generator=g)[:, 1],                        # non-contiguous
        lambda: torch.empty(0, 4),                                              # empty
        lambda: torch.randn(1, 2, 1, 2, 1, 2, generator=g).half(),              # 6-d fp16
    ]
    return kinds[(ord(tag) + i) % len(kinds)]()


def _channels(rank: int, world: int) -> dict:
    tp = _transport(rank, world, timeout_s=20)
    A, B = (0, 1, "F", 1, 0), (0, 1, "B", 1, 1)  # rank 0 -> rank 1
    C, D = (1, 0, "F", 0, 1), (1, 0, "B", 0, 0)  # rank 1 -> rank 0
    L = (0, 0, "F", 2, 1)  # loopback on rank 0
    res: dict[str, Any] = {"ok": []}
    for rnd in range(2):  # two steps: re-arming works
        o = 10 * rnd
        if rank == 0:
            send = [(A, "A", 0), (B, "B", 0), (A, "A", 1), (A, "A", 2), (B, "B", 1), (B, "B", 2), (A, "A", 3),
                    (B, "B", 3)]
            want = [(D, "D", 1), (C, "C", 2), (D, "D", 0), (C, "C", 0), (C, "C", 1), (D, "D", 2)]  # any order
            tp.expect([(ch, o + i) for ch, _, i in want] + [(L, o)])
        else:
            send = [(C, "C", 0), (D, "D", 0), (D, "D", 1), (C, "C", 1), (C, "C", 2), (D, "D", 2)]
            want = [(B, "B", 0), (B, "B", 1), (B, "B", 2), (B, "B", 3), (A, "A", 0), (A, "A", 1), (A, "A", 2),
                    (A, "A", 3)]
            tp.expect([(ch, o + i) for ch, _, i in want])
        for ch, tag, i in send:
            tp.send(ch, o + i, _payload(tag, i))
        if rank == 0:
            x = torch.randn(3)
            tp.send(L, o, x)
            res["ok"].append(("loopback", rnd, torch.equal(tp.recv(L, o), x)))
        for ch, tag, i in want:
            got, exp = tp.recv(ch, o + i), _payload(tag, i)
            same = got.dtype == exp.dtype and got.shape == exp.shape and torch.equal(got, exp)
            res["ok"].append((tag, rnd, i, same))
        tp.finish_step()
    res["stats"] = dataclasses.asdict(tp.stats())
    tp.close()
    return res


def test_two_channels_between_a_pair_do_not_mix():
    r0, r1 = spawn("channels", 2)
    for r in (r0, r1):
        assert all(entry[-1] for entry in r["ok"]), r["ok"]
    assert len(r0["ok"]) == 2 * 7 and len(r1["ok"]) == 2 * 8
    assert r0["stats"]["msgs_sent"] == r1["stats"]["msgs_received"] == 16
    assert r1["stats"]["msgs_sent"] == r0["stats"]["msgs_received"] == 12
    nbytes = lambda tags: 2 * sum(_payload(t, i).numel() * _payload(t, i).element_size()  # noqa: E731
                                  for t, n in tags for i in range(n))
    assert r0["stats"]["bytes_sent"] == r1["stats"]["bytes_received"] == nbytes([("A", 4), ("B", 4)])
    assert r1["stats"]["bytes_sent"] == r0["stats"]["bytes_received"] == nbytes([("C", 3), ("D", 3)])


# ----------------------------------------------------------------------------------------------------------------
# in-process checks (no torch.distributed needed)
@pytest.mark.parametrize("name,ranks,mbs", [("1f1b", 4, 6), ("zb1p", 3, 6), ("dualpipe", 4, 8),
                                            ("dualpipev", 3, 6)])
def test_expected_recvs_match_runner_and_with_comms(name, ranks, mbs):
    from raymoe.schedule import OpKind, QueueTransport
    sched = build(name, ranks, mbs)
    for r in range(ranks):
        runner = StageRunner(sched, r, {k: nn.Identity() for k in sched.chunks(r)}, QueueTransport(), _loss)
        want = [rc for op in sched.ops(r) for rc in runner._recvs(op)]
        got = expected_recvs(sched, r)
        assert got == want
        comms = [((op.peer, r, "F" if op.kind is OpKind.RECV_F else "B", op.stage, op.direction), sched.mb_id(op))
                 for op in sched.with_comms(r) if op.kind in (OpKind.RECV_F, OpKind.RECV_B)]
        assert [g for g in got if g[0][0] != r] == comms


def test_loopback_and_misuse_without_network():
    tp = P2PTransport(0, {0: 0})
    ch = (0, 0, "F", 1, 1)
    tp.expect([(ch, 0)])
    x = torch.randn(2)
    tp.send(ch, 0, x)
    assert tp.poll(ch, 0) and tp.recv(ch, 0) is not None
    tp.finish_step()
    with pytest.raises(P2PError, match="not announced"):
        tp.recv(ch, 1)
    with pytest.raises(P2PError, match="source is not this rank"):
        tp.send((1, 0, "F", 1, 0), 0, x)
    with pytest.raises(P2PError, match="kind must be"):
        tp.send((0, 0, "X", 1, 0), 0, x)
    with pytest.raises(P2PError, match="at most"):
        tp.send(ch, 0, torch.zeros([1] * 9))
    tp.expect([(ch, 2)])
    with pytest.raises(P2PError, match="before its send"):
        tp.recv(ch, 2)
    with pytest.raises(P2PError, match="expected but never received"):
        tp.finish_step()
    tp.close()
    with pytest.raises(P2PError, match="closed"):
        tp.send(ch, 0, x)


SCENARIOS: dict[str, Callable[..., Any]] = {
    "pipeline": _pipeline, "overlap": _overlap, "timeouts": _timeouts, "channels": _channels,
}
