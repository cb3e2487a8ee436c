"""The memory plan (raymoe.plan): 671B numbers against a hand computation from the config formula, the published
DeepSeek-V3 layouts, the plan job's output, and the parameter bytes the runtime really builds for pp/ep layouts."""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
from rich.console import Console

from raymoe.config import ModelConfig
from raymoe.plan.serve import ServeLayout, plan_serving
from raymoe.plan.train import PRECISIONS, Cluster, TrainLayout, layer_activation_values, plan_training

V3 = ModelConfig.preset("deepseek-v3")
GiB = 1024**3


def _hand_v3() -> dict[str, int]:
    """DeepSeek-V3 parameter counts written out from the architecture (report §2, HF config.json)."""
    D, V, H = 7168, 129280, 128
    q_lora, kv_lora, nope, rope, vd = 1536, 512, 128, 64, 128
    attn = (D * q_lora + q_lora + q_lora * H * (nope + rope)  # W^DQ, its RMSNorm, W^UQ (with W^QR)
            + D * (kv_lora + rope) + kv_lora + kv_lora * H * (nope + vd)  # W^DKV+W^KR, its RMSNorm, W^UK+W^UV
            + H * vd * D)  # W^O
    expert = 3 * D * 2048
    return {
        "attn": attn, "norms": 2 * D, "dense_ffn": 3 * D * 18432, "expert": expert,
        "moe_dense": 256 * D + 1 * expert,  # router + 1 shared expert
        "moe_routed": 256 * expert, "emb": V * D, "head": V * D, "final_norm": D,
        "mtp_extra": 2 * D + 2 * D * D + D,  # enorm, hnorm, eh_proj, its head norm
    }


def test_v3_parameter_totals_match_hand_count() -> None:
    from raymoe.plan import param_report

    h = _hand_v3()
    layer_common = h["attn"] + h["norms"]
    main = (61 * layer_common + 3 * h["dense_ffn"] + 58 * (h["moe_dense"] + h["moe_routed"])
            + h["emb"] + h["head"] + h["final_norm"])
    mtp = h["mtp_extra"] + layer_common + h["moe_dense"] + h["moe_routed"]
    r = param_report(V3)
    assert r.total_main == main and r.mtp_unique == mtp
    assert round(main / 1e9) == 671  # the published total (MTP excluded)


def test_v3_training_plan_per_stage_matches_hand_count() -> None:
    """PP16 DualPipe EP64 ZeRO-1 on 2048 GPUs: per-device parameters of every pipeline rank from the formula."""
    h = _hand_v3()
    plan = plan_training(V3, TrainLayout(pp=16, ep=64, schedule="dualpipe", num_microbatches=120,
                                         recompute="selective", precision="v3-fp8"), Cluster(num_nodes=256))
    assert plan.layout.dp == 2
    # 61 layers + 1 MTP block = 62 blocks over 16 stages: 14 stages of 4, then 3 and 2 + MTP
    stage_layers = [range(4 * s, 4 * s + 4) for s in range(14)] + [range(56, 59), range(59, 61)]
    layer_common = h["attn"] + h["norms"]

    def stage(s: int) -> tuple[int, int]:
        dense = expert = 0
        for i in stage_layers[s]:
            dense += layer_common + (h["dense_ffn"] if i < 3 else h["moe_dense"])
            expert += 0 if i < 3 else h["moe_routed"]
        if s == 15:
            dense += h["final_norm"] + h["head"] + h["mtp_extra"] + layer_common + h["moe_dense"]
            expert += h["moe_routed"]
        return dense, expert

    for r in range(16):
        ss = {r, 15 - r}  # DualPipe: rank r holds stages r and PP-1-r
        dense = sum(stage(s)[0] for s in ss) + (h["emb"] if ss & {0, 15} else 0)  # one table for embed + MTP
        expert = sum(stage(s)[1] for s in ss) // 64
        row = plan.ranks[r]
        assert (row.dense_params, row.expert_params) == (dense, expert), r
        assert row.weights == 2 * (dense + expert) and row.grads == 4 * (dense + expert)
        assert math.isclose(row.optimizer, 8 * (dense / 128 + expert / 2))  # ZeRO-1: dense /(ep·dp), experts /dp
        assert row.optimizer_unsharded == 8 * (dense + expert)
        assert row.in_flight == 17  # DualPipe: PP + 1 chunks
    assert plan.ranks[0].params == 5_343_227_904
    # the published layout fits an 80 GB GPU (79.6 GiB - 4 GiB reserve); only with the optimizer state sharded
    assert plan.fits and 5 * GiB < plan.margin < 20 * GiB
    assert plan.margin_unsharded < 0


def test_v3_selective_activation_table_by_hand() -> None:
    """Bytes per token of one MoE layer under V3's selective recompute with FP8-cached GEMM inputs."""
    D, H, K, I, E = 7168, 128, 8, 2048, 256
    kept_bf16 = D + 1536 + (512 + 64) + D  # attention input, q_a, kv_a (pre-norm), MoE input
    kept_fp8 = H * 128 + K * D + 2 * K * I + 2 * I  # attention output, dispatched tokens, SwiGLU inputs, shared
    kept_fp32 = H + E + 2 * K  # log-sum-exp, router scores, top-k weights and ids
    want = 2 * kept_bf16 + kept_fp8 + 4 * kept_fp32
    assert layer_activation_values(V3, "moe", "selective", PRECISIONS["v3-fp8"]) == want
    assert layer_activation_values(V3, "moe", "full", PRECISIONS["v3-fp8"]) == 2 * D
    none = layer_activation_values(V3, "moe", "none", PRECISIONS["v3-fp8"])
    # what selective recomputes: norm outputs, SwiGLU outputs (FP8) and the MLA up-projections q, k, v (BF16)
    assert none - want == (D + 1536 + 512 + D + K * I + I) + 2 * (2 * H * 192 + H * 128)


def test_1f1b_in_flight_follows_the_schedule() -> None:
    """1F1B: pipeline rank r holds PP - r micro-batches of its own stage."""
    L = TrainLayout(pp=4, ep=1, dp=1, schedule="1f1b", num_microbatches=8, micro_batch_size=2, seq_len=64)
    cfg = ModelConfig.preset("small")
    plan = plan_training(cfg, L, Cluster(num_nodes=1, gpus_per_node=4))
    per_tok = layer_activation_values(cfg, "moe", "none", PRECISIONS["fp32"])
    for r in (1, 2):  # middle stages: two MoE layers each (8 layers + MTP over 4 stages: 3, 2, 2, 1+MTP)
        assert plan.ranks[r].in_flight == 4 - r
        assert plan.ranks[r].activations == (4 - r) * 2 * 64 * 2 * per_tok
        assert plan.ranks[r].workspace == 0


@pytest.mark.parametrize("layout, nodes, per_gpu, tp, shared_in_slots", [
    ("paper prefill", 4, 9, 4, 0), ("paper decode", 40, 1, 4, 32),
    ("production prefill", 4, 9, 1, 0), ("production decode", 18, 2, 1, 0),
])
def test_v3_serving_units_by_hand(layout: str, nodes: int, per_gpu: int, tp: int, shared_in_slots: int) -> None:
    """Weights per GPU and KV cache per sequence of the published serving units, in FP8 with 128×128 scales."""
    plan = plan_serving(V3, ServeLayout(num_nodes=nodes, attention_tp=tp, redundant_experts=32,
                                        shared_expert_slots=shared_in_slots, context_len=4096),
                        Cluster(num_nodes=256))
    D = 7168
    fp8 = lambda r, c: r * c + 4 * math.ceil(r / 128) * math.ceil(c / 128)  # noqa: E731
    expert = 2 * fp8(D, 2048) + fp8(2048, D)
    assert plan.experts_per_gpu == per_gpu
    assert plan.expert_weights == per_gpu * 59 * expert  # 58 MoE layers + the MTP block
    attn = (fp8(D, 1536) + fp8(1536, 128 * 192) + fp8(D, 576) + fp8(512, 128 * 256) + fp8(128 * 128, D))
    matrices = 62 * attn + 3 * 3 * fp8(D, 18432) + 59 * (0 if shared_in_slots else expert) + fp8(D, 2 * D)
    small = 2 * (2 * 129280 * D) / tp + 2 * (59 * 256 * D + 62 * 2 * D + 1536 * 62 + 512 * 62 + D + 3 * D)
    assert math.isclose(plan.attention_weights, matrices / tp + small, rel_tol=1e-12)
    assert plan.kv_per_sequence == 576 * 62 * 2 * 4096
    assert plan.fits and plan.sequences_per_gpu >= 100


def _run_plan(*overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run([sys.executable, "-m", "raymoe.jobs.plan", *overrides], capture_output=True, text=True,
                          env=env, timeout=120)


def test_plan_job_prints_the_v3_training_table() -> None:
    p = _run_plan("model=deepseek-v3", "layout=v3-train", "cluster=h800-2048")
    assert p.returncode == 0, p.stderr
    assert "pp=16 × ep=64 × dp=2 = 2048 ranks" in p.stdout
    rows = [ln for ln in p.stdout.splitlines() if ln.startswith("│")]
    assert len(rows) == 16 and rows[0].split("│")[2].strip() == "0+15"
    assert "FITS: the fullest device (pp rank 0) needs 64.65 of" in p.stdout
    bad = _run_plan("layout=v3-train", "layout.train.recompute=nope")
    assert bad.returncode == 2 and "recompute" in bad.stderr


def test_plan_job_serving_and_not_fitting() -> None:
    from hydra import compose, initialize_config_module

    from raymoe.jobs.configs import to_object
    from raymoe.jobs.plan import PlanJobConfig, run

    outs = {}
    with initialize_config_module("raymoe.conf", version_base="1.3"):
        for layout in ("v3-prefill", "v3-decode", "v3-prefill-production", "v3-decode-production"):
            cfg = to_object(compose("plan", [f"layout={layout}"]), PlanJobConfig)
            con = Console(record=True, width=200)
            plan = run(cfg, con)
            outs[layout] = (plan, con.export_text())
        cfg = to_object(compose("plan", ["model=small", "layout=dualpipe-pp2-ep2", "cluster=cpu-8",
                                         "cluster.gpu_memory_GiB=0.6", "cluster.reserve_GiB=0.1"]), PlanJobConfig)
        con = Console(record=True, width=200)
        small = run(cfg, con)
        text = con.export_text()
    assert [outs[k][0].gpus for k in outs] == [32, 320, 32, 144]
    assert all(p.fits and "FITS: weights" in text for p, text in outs.values())
    assert not small.fits and "DOES NOT FIT" in text
    assert f"{-small.margin / GiB:.2f} GiB over" in text


@pytest.mark.parametrize("preset, pp, ep, schedule", [
    ("tiny", 2, 1, "1f1b"), ("tiny", 1, 4, "1f1b"), ("tiny", 4, 2, "1f1b"), ("tiny", 2, 2, "dualpipe"),
    ("tiny", 2, 4, "dualpipev"), ("small", 2, 2, "dualpipe"),
])
def test_plan_parameter_bytes_equal_what_the_runtime_builds(preset: str, pp: int, ep: int, schedule: str) -> None:
    """The runtime's parallelize steps (apply_pp, apply_ep) in one process: each rank's fp32 tensor bytes."""
    from raymoe.train.parallelize import apply_ep, apply_pp, build_model
    from raymoe.train.topology import Topology

    cfg = ModelConfig.preset(preset)
    C = 2 * pp if schedule.startswith("dualpipe") else pp
    plan = plan_training(cfg, TrainLayout(pp=pp, ep=ep, dp=1, schedule=schedule, num_microbatches=C,
                                          precision="fp32"))
    topo = Topology(pp, ep, 1, schedule, C, cfg)
    full = build_model(cfg, seed=0)
    for rank in range(topo.world_size):
        model = copy.deepcopy(full)
        apply_pp(model, topo, rank)
        apply_ep(model, topo, rank, None)
        held = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
        planned = plan.ranks[topo.coords(rank).pp_rank].weights
        assert abs(held - planned) <= 0.05 * held, (rank, held, planned)
        assert held == planned, (rank, held, planned)  # exact today; the 5% above is the contract
