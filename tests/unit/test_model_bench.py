"""The model benchmark's inputs and outputs (its numbers are reported, never asserted as timings)."""
from __future__ import annotations

import json

import pytest
import torch

from raymoe.config import ModelConfig
from raymoe.jobs.benches.model import BatchStream, plot_ratios, run


def test_batch_stream_never_repeats_a_batch_and_labels_are_next_tokens() -> None:
    cfg = ModelConfig.preset("tiny")
    s = BatchStream(cfg, batch=2, seq=16, text=None)
    seen = []
    for _ in range(4):
        x, y = s()
        assert x.shape == y.shape == (2, 16) and int(x.max()) < cfg.vocab_size
        assert torch.equal(y[:, :-1], x[:, 1:])
        seen.append(x)
    assert all(not torch.equal(a, b) for i, a in enumerate(seen) for b in seen[i + 1:])
    again = BatchStream(cfg, batch=2, seq=16, text=None)  # seeded: the same sequence for a rerun
    assert torch.equal(again()[0], seen[0])


@pytest.mark.slow
def test_batch_stream_walks_real_text() -> None:
    cfg = ModelConfig.preset("tiny")
    s = BatchStream(cfg, batch=2, seq=32, text="shakespeare")
    (x1, y1), (x2, _) = s(), s()
    assert not torch.equal(x1, x2) and torch.equal(y1[:, :-1], x1[:, 1:])
    assert len(torch.unique(x1)) > 16  # text, not padding


@pytest.mark.slow
def test_model_bench_runs_ours_and_hf_and_plots(tmp_path) -> None:
    pytest.importorskip("transformers")
    res = run({"presets": "tiny", "dtypes": "float32", "batch": "1", "seq": "32", "iters": "1", "warmup": "0",
               "plot": str(tmp_path / "b.png")})
    rows = res["rows"]
    assert {r["impl"] for r in rows} == {"auto", "grouped_mm", "padded", "loop", "bmm"}
    for r in rows:
        assert r["ours_tokens_per_s"] > 0 and r["hf_tokens_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["ours_tokens_per_s"] / r["hf_tokens_per_s"])
    b = res["breakdown"]["tiny"]
    assert sum(b[k] for k in ("attention", "router", "experts", "shared_experts", "other")) == pytest.approx(1.0)
    assert (tmp_path / "b.png").stat().st_size > 10_000
    json.dumps(res, default=str)  # the dispatcher writes it as JSON
    assert plot_ratios([res], str(tmp_path / "c.png"), impl="loop").endswith("c.png")
