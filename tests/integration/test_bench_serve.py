"""`python -m raymoe.jobs.bench serve` on the tiny model, minimal sizes: decode rows (ours vs transformers, equal
greedy outputs), MTP rows on held-out text, and the Serve app under load (AsyncOpenAI) vs the in-process engine."""
from __future__ import annotations

import pytest

pytest.importorskip("openai")
pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("ray_session")


def test_bench_serve_tiny_minimal(tmp_path) -> None:
    import ray

    from raymoe.config import ModelConfig
    from raymoe.jobs.benches import serve as bench

    png = tmp_path / "serve_latency.png"
    out = bench.run({"model": "tiny", "tiny_steps": "10", "batches": "1,4", "prompt_len": "8", "new_tokens": "4",
                     "reps": "1", "spec": "1", "mtp_prompts": "2", "mtp_prompt_len": "16", "mtp_new_tokens": "8",
                     "conc": "1,2", "load_requests": "2", "load_tokens": "4", "load_timeout": "60",
                     "num_blocks": "128", "plot": str(png)})
    assert ray.is_initialized()  # the bench reused the session's Ray and left it running
    dec = out["decode"]
    assert [(r["model"], r["batch"]) for r in dec] == [("tiny", 1), ("tiny", 4)]
    for r in dec:
        assert r["outputs_equal"] is True
        assert r["ours_decode_tok_s"] > 0 and r["hf_decode_tok_s"] > 0 and r["ratio"] > 0 and r["ratio_e2e"] > 0
        # the tiny checkpoint has an MTP module: ours with one draft per step gave the same tokens (checked inside)
        assert r["mtp_k"] == 1 and 1 <= r["mtp_tokens_per_forward"] <= 2 and r["ratio_mtp"] > 0
        # bandwidth floor: a batch-1 decode step touches exactly top-k (2) experts per MoE layer, a batch of 4 2..8
        lo, hi = (2, 2) if r["batch"] == 1 else (2, 8)
        assert lo <= r["touched_experts_per_layer"] <= hi
        assert r["read_mb_per_step"] > 0 and r["stream_gb_s"] > 0
        lo, hi = r["stream_gb_s_range"]  # measured before and after every timed generation; the floor uses the median
        assert 0 < lo <= r["stream_gb_s"] <= hi
        # the floor counts the latent cache the step reads: every layer's C + R fp32 values per key, 8 + 4/2 keys
        cfg = ModelConfig.preset("tiny")
        cache_mb = cfg.num_hidden_layers * r["batch"] * 10 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 / 1e6
        assert r["cache_mb_per_step"] == pytest.approx(cache_mb) and r["read_mb_per_step"] > cache_mb
        assert r["floor_step_ms"] == pytest.approx(r["read_mb_per_step"] / r["stream_gb_s"])
        assert r["bandwidth_bound_ratio"] == pytest.approx(r["hf_step_ms"] / r["floor_step_ms"])
    (m,) = out["mtp"]["rows"]
    assert m["k"] == 1 and m["outputs_equal_no_spec"] is True
    assert 0 <= m["acceptance_rate"] <= 1 and 1 <= m["tokens_per_target_forward"] <= 2
    assert "shakespeare" in out["mtp"]["text"] or "TINY_TEXT" in out["mtp"]["text"]
    levels = out["load"]["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        for path in ("serve", "inproc"):
            x = lv[path]
            assert x["ok"] == 2 and x["failed"] == 0, x
            assert x["ttft_p50"] > 0 and x["ttft_p99"] >= x["ttft_p50"] and x["tpot_p50"] > 0
            assert x["tokens_per_s"] > 0
        assert lv["hop_throughput_ratio"] > 0 and lv["hop_tpot_p50_ratio"] > 0
    assert png.exists() and png.stat().st_size > 0
