"""Fault tolerance and elastic DP with real process kills (SIGKILL of a stage actor's process from the test).

Every run is compared with an uninterrupted run of the same config: per-step losses and the samples each step
consumed (``data/sample_ids`` in the metrics; after a recovery the replayed steps are logged again, so the last
record of each step is the one that counted).
"""
from __future__ import annotations

import collections
import json
import os
import pathlib
import signal
import time

import pytest

from raymoe.config import (DataConfig, ElasticConfig, LoggerConfig, ModelConfig, ParallelConfig, RunConfig,
                           TrainConfig)

pytestmark = pytest.mark.usefixtures("ray_session")


def _run(tmp: pathlib.Path, name: str, *, dp: int = 1, steps: int = 8, impl: str = "auto", cpus: float = 0.25,
         elastic: tuple[int, int] | None = None, **train_kw) -> RunConfig:
    train = dict(steps=steps, micro_batch_size=2, num_microbatches=2, checkpoint_every=2, eval_every=100,
                 eval_batches=1, warmup_tokens=200, seed=0, export_hf=False, max_failures=3)
    train.update(train_kw)
    return RunConfig(
        model=ModelConfig.preset("tiny"),
        # native runs keep the optimizer state replicated (parallel.zero_stage=0), which a hand-off needs; ZeRO-1's
        # resizes through checkpoints are tests/integration/test_zero.py's
        parallel=ParallelConfig(dp=dp, num_cpus_per_rank=cpus, dp_impl=impl, zero_stage=0 if impl == "native" else 1),
        train=TrainConfig(**train),
        data=DataConfig(seq_len=32),
        elastic=ElasticConfig(min_dp=elastic[0], max_dp=elastic[1], monitor_every_steps=2,
                              wait_for_resources_s=20, settle_s=8.0) if elastic else ElasticConfig(),
        logger=LoggerConfig(kind="none"),
        run_dir=str(tmp / name),
    )


def _status(coord) -> dict:
    import ray

    return ray.get(coord.status.remote(), timeout=60)


def _drive(run: RunConfig, events: list | None = None, timeout: float = 600, env: dict | None = None) -> dict:
    """Run to the end; ``events`` = [(when, action(coord))] fired once each, in order, as soon as the run passes
    step ``when`` (an int) or ``when(status)`` is true.
    ``env``: RAYMOE_* variables for the coordinator (it forwards them to the stage actors)."""
    import ray

    from raymoe.actors import Coordinator

    coord = Coordinator.options(runtime_env={"env_vars": env} if env else None).remote(run)
    try:
        ray.get(coord.setup.remote(), timeout=300)
        coord.initial_pids = ray.get(coord.inspect.remote("pid"), timeout=120)  # read before the ranks get busy
        fut = coord.run_training.remote()
        pending = list(events or [])
        t0 = time.time()
        while True:
            done, _ = ray.wait([fut], timeout=0.05)
            if done:
                break
            if pending:
                st, when = _status(coord), pending[0][0]
                if (int(st.get("step", 0)) >= when) if isinstance(when, int) else when(st):
                    pending.pop(0)[1](coord)
            assert time.time() - t0 < timeout, "run did not finish"
        summary = ray.get(fut)
        assert not pending, f"run ended before {len(pending)} event(s) fired"
        ray.get(coord.shutdown.remote(), timeout=60)
        summary["initial_pids"] = coord.initial_pids
        return summary
    finally:
        ray.kill(coord)


def _kill_rank(rank: int):
    def action(coord) -> None:
        import ray

        pid = ray.get(coord.inspect.remote("pid"), timeout=120)[rank]
        os.kill(pid, signal.SIGKILL)

    return action


def _samples(run: RunConfig) -> dict[int, list[int]]:
    last: dict[int, list[int]] = {}
    for line in open(pathlib.Path(run.run_dir) / "metrics.jsonl"):
        r = json.loads(line)
        if "data/sample_ids" in r:
            last[r["step"]] = r["data/sample_ids"]
    return last


def _assert_same_samples(a: RunConfig, b: RunConfig) -> None:
    sa, sb = _samples(a), _samples(b)
    assert sorted(sa) == sorted(sb)
    assert sa == sb, "a step consumed different samples"
    ca = collections.Counter(i for ids in sa.values() for i in ids)
    cb = collections.Counter(i for ids in sb.values() for i in ids)
    assert ca == cb  # nothing replayed twice into the optimizer, nothing skipped


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(dp, impl) -> (RunConfig, summary)``: the uninterrupted 8-step run, made once per (dp, impl) and
    shared by every test that compares against it."""
    made: dict[tuple[int, str], tuple[RunConfig, dict]] = {}

    def get(dp: int, impl: str = "auto") -> tuple[RunConfig, dict]:
        if (dp, impl) not in made:
            run = _run(tmp_path_factory.mktemp("ref"), f"ref_dp{dp}_{impl}", dp=dp, impl=impl)
            made[(dp, impl)] = (run, _drive(run))
        return made[(dp, impl)]

    return get


# dp=1 on the native runtime (its reference is shared with the checkpoint-write test), dp=2 on DeepSpeed ZeRO-1
# (what dp_impl=auto picks for fixed-size pure data parallelism)
@pytest.mark.parametrize("dp, impl", [(1, "native"), (2, "auto")])
def test_killed_rank_is_replaced_and_the_run_matches(tmp_path, reference, dp, impl) -> None:
    ref_run, ref = reference(dp, impl)
    run = _run(tmp_path, f"kill{dp}", dp=dp, impl=impl)
    s = _drive(run, events=[(3, _kill_rank(dp - 1))])
    assert s["finished"] and s["steps"] == 8
    assert len(s["recoveries"]) == 1, s["recoveries"]
    rec = s["recoveries"][0]
    assert rec["dp_before"] == rec["dp_after"] == dp and rec["seconds"] > 0 and "died" in rec["reason"]
    assert rec["resumed_step"] in (2, 4)  # rolled back to the newest committed checkpoint
    # no hand-off: dp=1 leaves no whole replica; DeepSpeed ZeRO-1 shards the optimizer state over DP
    assert rec["recovery"] == "checkpoint", rec
    assert ("no DP replica survived whole" if impl == "native" else "ZeRO-1") in rec["handoff_skipped"], rec
    assert rec["handoff_skipped"] in rec["reason"]
    assert s["losses"] == ref["losses"], (s["losses"], ref["losses"])  # bit-identical: exact resume path
    _assert_same_samples(run, ref_run)


def test_shrink_then_grow_keeps_the_global_batch(tmp_path, reference) -> None:
    """dp 2 → 1 (a replica dies while the cluster has room for one) → 2 (resources come back); the reference is
    the uninterrupted fixed dp=2 native run (elastic bounds change no arithmetic)."""
    import ray

    ref_run, ref = reference(2, "native")

    @ray.remote(num_cpus=5)
    def squat(seconds: float) -> None:  # holds the dead replica's CPUs: the cluster "lost a node"
        time.sleep(seconds)

    ray.get(squat.remote(0.0))  # warm a worker process: the squatter must win the freed CPUs within settle_s
    holder: dict = {}

    def kill_and_squat(coord) -> None:
        holder["squatter"] = squat.remote(600.0)  # pending: only 2 CPUs are free until the kill
        _kill_rank(1)(coord)

    def free_resources(coord) -> None:
        ray.cancel(holder.pop("squatter"), force=True)

    run = _run(tmp_path, "elastic", dp=2, impl="native", elastic=(1, 2), cpus=3)
    shrunk = lambda st: st.get("recoveries", 0) >= 1 and st.get("dp") == 1 and st.get("step", 0) >= 3  # noqa: E731
    s = _drive(run, events=[(3, kill_and_squat), (shrunk, free_resources)])
    assert s["finished"] and s["steps"] == 8
    dps = [(r["dp_before"], r["dp_after"]) for r in s["recoveries"]]
    assert dps == [(2, 1), (1, 2)], json.dumps(s["recoveries"])
    # the surviving replica kept its state through both (no step recomputed, no checkpoint read)
    assert [(r["recovery"], r["steps_recomputed"]) for r in s["recoveries"]] == [("handoff", 0)] * 2, s["recoveries"]
    assert all(r["seconds"] > 0 for r in s["recoveries"])
    assert s["layout"]["dp"] == 2
    for a, b in zip(s["losses"], ref["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (s["losses"], ref["losses"])
    _assert_same_samples(run, ref_run)


def test_failures_past_max_failures_stop_with_checkpoints_intact(tmp_path) -> None:
    import ray

    from raymoe import checkpoint as ckpt

    run = _run(tmp_path, "flaky", dp=1, impl="native", max_failures=1, steps=12)
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        _drive(run, events=[(3, _kill_rank(0)), (5, _kill_rank(0))])
    msg = str(err.value)
    assert "train.max_failures=1" in msg and "checkpoints are intact" in msg
    newest = ckpt.latest_valid(pathlib.Path(run.run_dir) / "checkpoints")
    assert newest is not None
    # the last good checkpoint still loads: resume and finish
    again = _run(tmp_path, "flaky", dp=1, impl="native", max_failures=1, steps=12)
    s = _drive(again)
    assert s["finished"] and s["resumed_from"] == str(newest)


def test_kill_during_checkpoint_write_uses_the_previous_one(tmp_path, reference) -> None:
    """The rank sleeps inside save (test-only delay); the test kills it there: step 4's checkpoint never commits."""
    import ray

    _, ref = reference(1, "native")
    run = _run(tmp_path, "ck", dp=1, impl="native")

    def kill_in_save(coord) -> None:
        pid = coord.initial_pids[0]  # asking the rank now would wait for its save to finish
        deadline = time.time() + 60
        while ray.get(coord.status.remote()).get("phase") != "checkpoint":
            assert time.time() < deadline
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)

    s = _drive(run, events=[(3, kill_in_save)], env={"RAYMOE_TEST_SAVE_DELAY_S": "3"})
    assert s["finished"]
    rec = s["recoveries"][0]
    assert rec["resumed_step"] == 2, rec
    assert s["losses"] == ref["losses"]


def test_hung_rank_is_detected_within_the_step_timeout_and_replaced(tmp_path, reference) -> None:
    """SIGSTOP (a real hang: the process is alive but does nothing) of one replica: its peer blocks in the gradient
    all-reduce, the step exceeds train.step_timeout_s, the group is torn down and rebuilt, and the run matches."""
    ref_run, ref = reference(2, "native")
    run = _run(tmp_path, "hang", dp=2, impl="native", step_timeout_s=20.0)

    def stop_rank(coord) -> None:
        os.kill(coord.initial_pids[1], signal.SIGSTOP)

    s = _drive(run, events=[(3, stop_rank)])
    assert s["finished"] and len(s["recoveries"]) == 1
    rec = s["recoveries"][0]
    assert "did not finish" in rec["reason"] and "within 20 s" in rec["reason"], rec
    assert s["losses"] == ref["losses"]
    _assert_same_samples(run, ref_run)


def test_surviving_replica_hands_its_state_to_the_replacement(tmp_path, reference) -> None:
    """dp=2 native: the one rank of replica 1 is SIGKILLed at step 3. Replica 0 keeps its process and in-memory
    state; a new rank takes that state over the process group (elastic.recovery=handoff, the default): no completed
    step is recomputed (each step's samples are logged once), no checkpoint is read, and the run equals the
    uninterrupted one (the step in flight, if any, is redone with the same samples)."""
    import ray

    ref_run, ref = reference(2, "native")
    run = _run(tmp_path, "handoff", dp=2, impl="native")
    killed: dict = {}

    def kill(coord) -> None:
        killed["pid"] = ray.get(coord.inspect.remote("pid"), timeout=120)[1]
        os.kill(killed["pid"], signal.SIGKILL)

    s = _drive(run, events=[(3, kill)])
    assert s["finished"] and s["steps"] == 8
    assert len(s["recoveries"]) == 1, s["recoveries"]
    rec = s["recoveries"][0]
    assert rec["recovery"] == "handoff" and "died" in rec["reason"], rec
    assert rec["steps_recomputed"] == 0 and rec["checkpoint"] is None
    if "during step" in rec["reason"]:  # the step in flight was redone from the survivor's pre-step state, or the
        assert (rec["redone_step"] == rec["step"]) != rec["in_flight_completed"], rec  # survivor had applied it
    else:  # the kill hit a checkpoint save: that call was re-run on the re-formed group, no step was in flight
        assert "during save" in rec["reason"] and rec["redone_step"] is None and not rec["in_flight_completed"], rec
    assert rec["resumed_step"] == rec["step"] >= 3, rec  # not rolled back to a checkpoint
    assert (rec["dp_before"], rec["dp_after"], rec["survivors"], rec["new_ranks"]) == (2, 2, [0], [1]), rec
    assert rec["handoff_bytes"] > 1_000_000 and rec["seconds"] > 0  # the tiny model's parameters + AdamW moments
    pids = [p["pid"] for p in s["placement"]]
    assert pids[0] == s["initial_pids"][0] and pids[1] != killed["pid"]  # the survivor kept its process
    for a, b in zip(s["losses"], ref["losses"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (s["losses"], ref["losses"])
    _assert_same_samples(run, ref_run)
    logged = collections.Counter(json.loads(line)["step"] for line in open(pathlib.Path(run.run_dir) / "metrics.jsonl")
                                 if "data/sample_ids" in line)
    assert sorted(logged) == list(range(1, 9)) and set(logged.values()) == {1}, logged  # no step ran twice
