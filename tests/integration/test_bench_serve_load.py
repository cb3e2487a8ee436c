"""`python -m raymoe.jobs.bench serve parts=load_rates` on the tiny model, minimal sizes: the real Serve app under
open-loop Poisson load from `AsyncOpenAI`, a shared-prefix and a random trace, prefix caching on and off."""
from __future__ import annotations

import pytest

pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("ray_session")

N, TOKENS, PREFIX, SUFFIX, BLOCK = 8, 4, 48, 16, 16


def test_bench_serve_load_rates_minimal(tmp_path) -> None:
    import ray

    from raymoe.jobs.benches import serve as bench

    png = tmp_path / "rates.png"
    out = bench.run({"parts": "load_rates", "tiny_steps": "10", "rates": "4,16", "rates_requests": str(N),
                     "rates_tokens": str(TOKENS), "rates_prefix": str(PREFIX), "rates_suffix": str(SUFFIX),
                     "rates_groups": "2", "rates_timeout": "60", "rates_warmup": "2", "num_blocks": "256",
                     "rates_plot": str(png)})
    assert ray.is_initialized()  # the session's Ray was reused and left running
    res = out["load_rates"]
    rows = res["rows"]
    assert [(r["trace"], r["cache"], r["offered_req_s"]) for r in rows] == [
        (t, c, q) for c in ("on", "off") for t in ("shared", "random") for q in (4.0, 16.0)]
    L = PREFIX + SUFFIX
    # a prompt of L tokens reuses at most block · ⌊(L − 1) / block⌋; with one MTP draft (load_spec=1) a shared
    # prefix of 48 gives block · ⌊(48 − 1) / block⌋ = 32 (48 if two suffixes happen to share their first token)
    most = N * BLOCK * ((L - 1) // BLOCK)
    for r in rows:
        assert r["requests"] == N and r["ok"] == N and r["failed"] == 0, r["errors"]
        assert r["output_tokens"] == N * TOKENS  # every request streamed exactly max_tokens (EOS ignored)
        assert r["prompt_tokens"] == N * L
        assert 0 < r["ttft_p50"] <= r["ttft_p99"] and 0 < r["tpot_p50"] <= r["tpot_p99"]
        assert r["ttft_p99"] < r["window_s"]
        assert r["achieved_req_s"] == pytest.approx(N / r["window_s"])
        assert r["output_tokens_per_s"] == pytest.approx(N * TOKENS / r["window_s"])
        assert r["sent_req_s"] > 0
        assert r["cached_tokens"] % BLOCK == 0 and r["cached_tokens"] <= most
        assert r["hit_rate"] == pytest.approx(r["cached_tokens"] / r["prompt_tokens"])
        if r["cache"] == "on":  # the replica's own counters agree with the responses' usage
            assert (r["engine_hits"], r["engine_queries"]) == (r["cached_tokens"], r["prompt_tokens"])
        else:  # the engine counts nothing with the cache off
            assert (r["engine_hits"], r["engine_queries"]) == (0, 0)
        if r["cache"] == "off" or r["trace"] == "random":
            assert r["cached_tokens"] == 0 and r["hit_rate"] == 0.0
    on = {r["offered_req_s"]: r for r in rows if (r["trace"], r["cache"]) == ("shared", "on")}
    # 2 groups of 4, interleaved: at 4 req/s a group's next request arrives ~0.5 s after the one before it, long
    # after that one's prefix was cached; at least one of the 6 candidates must hit (and each hit is >= 32 tokens)
    assert on[4.0]["cached_tokens"] >= 2 * BLOCK and 0 < on[4.0]["hit_rate"] <= (N - 2) * 48 / (N * L)
    assert res["serve_startup_s"].keys() == {"on", "off"}
    assert png.exists() and png.stat().st_size > 0
