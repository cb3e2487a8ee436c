"""``bench serve parts=decode`` at minimal size on the tiny checkpoint: decode steps are timed directly (one per
generated token after the first, on our side and transformers'), prefill and end to end apart, and a step faster
than its bandwidth floor fails the bench. ``parts=prefill_attn`` at minimal size."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_decode_steps_are_timed_directly(tiny_ckpt) -> None:
    from raymoe.jobs.benches.serve import decode_bench

    (r,) = decode_bench("tiny", tiny_ckpt, [3], prompt_len=20, new_tokens=5, reps=1, spec=1)
    assert r["outputs_equal"] is True  # ours, ours absorbed-prefill, ours+MTP and HF: same ids (checked inside)
    steps = r["decode_steps_per_run"]
    # every prefill done in the first step: tokens 2..5 come from 4 decode-only steps of the whole batch, as HF's
    assert steps["ours"] == steps["absorbed"] == steps["torch"] == steps["hf"] == 4
    assert 1 <= steps["mtp"] <= 4 and 1 <= r["mtp_tokens_per_forward"] <= 2
    t = r["times_s"]
    for k in ("ours", "absorbed", "hf"):
        assert 0 < t[k]["prefill_s"] < t[k]["total_s"] and 0 < t[k]["step_s"] < t[k]["total_s"]
    assert r["ratio_prefill"] == pytest.approx(r["hf_prefill_s"] / r["ours_prefill_s"])
    assert r["ours_step_ms"] >= r["floor_step_ms"] and r["hf_step_ms"] >= r["floor_step_ms"]
    assert r["ratio_prefill_absorbed"] > 0 and r["ratio_e2e_absorbed"] > 0
    assert steps["loop"] == 4 and r["prefill_grouped_speedup"] == pytest.approx(r["loop_prefill_s"] /
                                                                               r["ours_prefill_s"])
    assert r["torch_gemm_step_ms"] >= r["floor_step_ms"]
    assert r["compute_floor_step_ms"] == pytest.approx(1e3 * r["step_gflop"] / r["matmul_gflops"])
    assert r["ours_step_over_roofline"] == pytest.approx(
        r["ours_step_ms"] / max(r["floor_step_ms"], r["compute_floor_step_ms"]))


def test_prefill_attention_bench_times_grouped_and_per_chunk_calls() -> None:
    from raymoe.jobs.benches.serve import prefill_attention_bench

    rows = prefill_attention_bench("tiny", [(6, 16), (2, 300)], reps=2)  # outputs compared inside (1e-5)
    assert [(r["batch"], r["prompt_len"]) for r in rows] == [(6, 16), (2, 300)]
    for r in rows:
        assert r["grouped_ms"] > 0 and r["loop_ms"] > 0
        assert r["loop_over_grouped"] == pytest.approx(r["loop_ms"] / r["grouped_ms"])


def test_decode_flops_count_every_gemm_weight_once_per_token() -> None:
    from raymoe.config import ModelConfig
    from raymoe.jobs.benches.serve import decode_flops
    from raymoe.model import DeepSeekV3

    c = ModelConfig.preset("small").replace(num_nextn_predict_layers=0)
    m = DeepSeekV3(c)
    D, L, H, C, R = c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
    n_moe = L - c.first_k_dense_replace
    attn_w = (D * (c.q_lora_rank + C + R) + c.q_lora_rank * H * c.qk_head_dim
              + C * H * (c.qk_nope_head_dim + c.v_head_dim) + H * c.v_head_dim * D)
    dense = 3 * D * c.intermediate_size
    shared = 3 * D * c.moe_intermediate_size * c.n_shared_experts
    per_token = (L * attn_w + c.first_k_dense_replace * dense + n_moe * (shared + c.n_routed_experts * D)
                 + c.vocab_size * D + n_moe * c.num_experts_per_tok * 3 * D * c.moe_intermediate_size
                 + L * H * 40 * (2 * C + R))
    assert decode_flops(m, 16, 40) == pytest.approx(2 * 16 * per_token)


def test_a_step_faster_than_its_floor_fails_the_bench(tiny_ckpt, monkeypatch) -> None:
    from raymoe.jobs.benches import serve

    # a machine streaming 1 kB/s: every measured step beats the floor, which only a measurement bug can do
    monkeypatch.setattr(serve, "streaming_read", lambda model, reps=5: (1e3, 0.1, 1.0))
    with pytest.raises(AssertionError, match="faster than its bandwidth floor"):
        serve.decode_bench("tiny", tiny_ckpt, [2], prompt_len=8, new_tokens=3, reps=1, spec=0, compare_prefill=False)
