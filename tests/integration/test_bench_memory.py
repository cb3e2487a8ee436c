"""`python -m raymoe.jobs.bench memory` on the tiny model, pp2×ep2 on 4 Ray stage actors: the tensor bytes every
rank really holds (parameters, gradients, AdamW state, walked on the actor) equal the memory plan's to 5 %."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("ray_session")


def test_bench_memory_tiny_pp2_ep2_matches_the_plan(tmp_path) -> None:
    import ray

    from raymoe.config import ModelConfig
    from raymoe.jobs.benches import memory
    from raymoe.plan.train import TrainLayout, plan_training

    out = memory.run({"model": "tiny", "layouts": "pp2xep2", "steps": "1", "seq_len": "32", "mb": "1",
                      "plot": str(tmp_path)})
    assert ray.is_initialized()  # the bench reused the session's Ray and left it running
    (L,) = out["layouts"]
    assert out["zero1"] is True  # the runtime's default: native ZeRO-1 (parallel.zero_stage=1)
    ranks = L["ranks"]
    assert [(r["pp_rank"], r["ep_rank"], r["dp_rank"]) for r in ranks] == [(0, 0, 0), (0, 1, 0), (1, 0, 0),
                                                                           (1, 1, 0)]
    # the reference, computed here: fp32 weights/grads, two fp32 AdamW moments, experts split over ep=2, the dense
    # parameters' moments over the ep × dp = 2 ranks that reduce their gradients (ZeRO-1)
    plan = plan_training(ModelConfig.preset("tiny"), TrainLayout(pp=2, ep=2, dp=1, num_microbatches=4,
                                                                  micro_batch_size=1, seq_len=32, zero1=True))
    for r in ranks:
        pr = plan.ranks[r["pp_rank"]]
        m = r["measured"]
        for key, pred in (("params", pr.weights), ("grads", pr.grads), ("optimizer", pr.optimizer)):
            assert abs(m[key] - pred) <= 0.05 * pred, (r["rank"], key, m[key], pred)
        assert m["params"] < m["optimizer"] < 2 * m["params"]  # two moments per parameter, the dense ones halved
        assert m["grads"] == m["params"]  # every parameter trains (the router bias is a buffer)
        assert r["activations_measured"] > 0
        d = r["decomposition"]
        assert r["rss"]["peak"] >= r["rss"]["after_init"] >= r["rss"]["start"] > 0
        assert sum(d.values()) == r["rss"]["peak"]
    # pp rank 1 holds the last stage (head, MTP, the embedding copy): more than pp rank 0
    assert ranks[2]["measured"]["params"] > ranks[0]["measured"]["params"]
    png = tmp_path / "memory.png"
    assert out["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layout_spec_parsing() -> None:
    from raymoe.jobs.benches.memory import layout_name, parse_layout

    assert parse_layout("pp2xep2xdp2", "1f1b") == (2, 2, 2, "1f1b")
    assert parse_layout("ep2", "1f1b") == (1, 2, 1, "1f1b")
    assert parse_layout("pp2xep2:dualpipe", "1f1b") == (2, 2, 1, "dualpipe")
    assert layout_name(2, 1, 2, "1f1b") == "pp2×dp2 1f1b" and layout_name(1, 1, 1, "1f1b") == "pp1"
    with pytest.raises(SystemExit, match="expected parts like pp2"):
        parse_layout("pp2-ep2", "1f1b")
