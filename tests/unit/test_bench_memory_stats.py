"""bench memory without Ray: one in-process rank (tiny, pp = ep = dp = 1, native DP) trains one step; the tensor
bytes ``PipelineWorker.memory_stats`` walks equal the plan's (zero1=False: what native DP does today), and the
bench's check rejects the same measurement against a plan that is wrong for it."""
from __future__ import annotations

import pytest


def test_memory_stats_of_one_rank_against_the_plan(tmp_path) -> None:
    from raymoe.data import prepare_data
    from raymoe.jobs.benches.memory import _run_config, check, compare, plan_of
    from raymoe.jobs.local_cluster import free_port
    from raymoe.malloc import process_rss
    from raymoe.train.controller import TrainController
    from raymoe.train.worker_group import LocalWorkerGroup

    run = _run_config("tiny", 1, 1, 1, "1f1b", 1, 1, 32, "none", "float32", 0, 1, str(tmp_path / "run"))
    info = prepare_data(run, progress=False)
    group = LocalWorkerGroup(run, free_port())
    try:
        w = group.worker
        before = w.memory_stats()
        assert before["grads"] == 0 and before["optimizer"] == 0  # AdamW allocates its state on the first step
        controller = TrainController(run, group, info["train_samples"], info["val_samples"])
        results, _ = controller.train_step()
        stats = w.memory_stats()
        n_tensors = sum(len(g["params"]) for g in w.optimizer.param_groups)
    finally:
        group.shutdown()
    numel = sum(p.numel() for p in w.model.parameters())
    assert stats["params"] == 4 * numel and stats["grads"] == 4 * numel  # fp32; every parameter trains
    assert stats["optimizer"] == 8 * numel + 4 * n_tensors  # two fp32 moments + a 4-byte step per tensor
    rss = process_rss()
    measured = {"stats": [{**stats, "rss_start": rss["rss"], "rss_after_init": rss["rss"], "rss_now": rss["rss"],
                           "rss_peak": rss["peak"]}],
                "activations": [results[0].peak_activation_bytes], "topo": controller.topo}
    ok = compare(run, measured, plan_of(run, zero1=False))
    assert ok[0]["measured"]["params"] == ok[0]["plan"]["params"]
    assert max(ok[0]["rel_err"].values()) < 1e-4  # only the step counters
    check([{"name": "pp1", "ranks": ok}], 0.05)
    # bf16 training keeps the same fp32 state (autocast): its plan agrees; a plan of another layout must not
    bf16 = _run_config("tiny", 1, 1, 1, "1f1b", 1, 1, 32, "none", "bfloat16", 0, 1, str(tmp_path / "run1"))
    check([{"name": "pp1", "ranks": compare(run, measured, plan_of(bf16, zero1=False))}], 0.05)
    other = _run_config("tiny", 2, 1, 1, "1f1b", 2, 1, 32, "none", "float32", 0, 1, str(tmp_path / "run2"))
    wrong = compare(run, measured, plan_of(other, zero1=False))
    with pytest.raises(RuntimeError, match=r"pp1 rank 0 params: measured \d+ B, plan \d+ B"):
        check([{"name": "pp1", "ranks": wrong}], 0.05)
