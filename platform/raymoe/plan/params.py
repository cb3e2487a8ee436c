"""Sizing of a model without allocating it: parameter counts and memory per pipeline stage.

The model is built on the meta device, so ``deepseek-v3`` (671B) costs no memory. Counting conventions
(docs/model.md §1): the *main model* excludes the MTP modules; MTP is reported separately as the parameters it
owns (its embedding and head are shared with the main model). *Activated per token* keeps every non-routed parameter
plus ``num_experts_per_tok`` routed experts per MoE layer; it is given with and without the embedding table.

:func:`stage_memory` is the quick per-pipeline-rank view (V3 byte counts, no activations): BF16 weights (2 B), FP32
gradients (4 B), FP32 master weights (4 B) and BF16 AdamW moments (2 × 2 B), the last two (8 B) ZeRO-1-sharded
over the ranks that hold the same tensor: ``ep × dp`` for dense parameters, ``dp`` for routed experts. Under
DualPipe rank r holds stage chunks r and PP−1−r. The full per-rank plan (activations from the schedule, recompute,
precision, serving) is :mod:`raymoe.plan.train` / :mod:`raymoe.plan.serve`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from raymoe.config import ModelConfig
from raymoe.model.transformer import DeepSeekV3, split_layers

__all__ = ["ParamReport", "param_report", "stage_memory", "train_flops_per_token"]


@dataclass
class ParamReport:
    total_main: int  # main model (embedding, layers, norm, head)
    mtp_unique: int  # parameters owned by the MTP modules
    embedding: int
    head: int
    per_expert: int
    routed_experts_main: int
    activated_incl_embedding: int
    activated_excl_embedding: int
    per_layer_attention: int
    per_moe_layer: int
    per_dense_ffn: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_report(cfg: ModelConfig) -> ParamReport:
    model = DeepSeekV3(cfg, device="meta")
    mtp_unique = _numel(model.mtp)
    total_main = _numel(model) - mtp_unique
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    n_moe = cfg.num_moe_layers
    routed = n_moe * cfg.n_routed_experts * per_expert
    inactive = n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    emb = model.embed_tokens.weight.numel()
    moe_layer = next((l for l in model.layers if l.is_moe), None)
    dense_layer = next((l for l in model.layers if not l.is_moe), None)
    return ParamReport(
        total_main=total_main,
        mtp_unique=mtp_unique,
        embedding=emb,
        head=model.lm_head.weight.numel(),
        per_expert=per_expert,
        routed_experts_main=routed,
        activated_incl_embedding=total_main - inactive,
        activated_excl_embedding=total_main - inactive - emb,
        per_layer_attention=_numel(model.layers[0].self_attn),
        per_moe_layer=_numel(moe_layer.mlp) if moe_layer is not None else 0,
        per_dense_ffn=_numel(dense_layer.mlp) if dense_layer is not None else 0,
    )


def stage_memory(
    cfg: ModelConfig,
    pp: int,
    ep: int = 1,
    dp: int = 1,
    dualpipe: bool = False,
    layers_per_stage: Optional[Sequence[int]] = None,
) -> list[dict[str, float]]:
    """Per pipeline rank: parameters held and GiB of weights/grads/optimizer state per device."""
    if ep < 1 or dp < 1:
        raise ValueError(f"ep and dp must be >= 1, got ep={ep} dp={dp}")
    if cfg.n_routed_experts % ep:
        raise ValueError(f"n_routed_experts={cfg.n_routed_experts} must be divisible by ep={ep}")
    if dualpipe and pp % 2:
        raise ValueError(f"DualPipe needs an even number of pipeline ranks, got pp={pp}")
    model = DeepSeekV3(cfg, device="meta")
    ranges = split_layers(cfg, pp, layers_per_stage)

    def stage_params(s: int) -> tuple[int, int]:
        dense = expert = 0
        mods = [model.layers[i] for i in ranges[s]]
        if s == pp - 1:
            dense += model.norm.weight.numel() + model.lm_head.weight.numel()
            mods += list(model.mtp)
        for m in mods:
            for name, p in m.named_parameters():
                if ".experts." in f".{name}" and "shared_experts" not in name:
                    expert += p.numel()
                else:
                    dense += p.numel()
        return dense, expert

    gib = 1024**3
    rows = []
    for r in range(pp):
        stages = [r, pp - 1 - r] if dualpipe else [r]
        dense = sum(stage_params(s)[0] for s in stages)
        expert = sum(stage_params(s)[1] for s in stages)
        # the embedding: stage 0 looks tokens up; the last stage's MTP blocks embed the shifted tokens with the same
        # table, so a rank holding either holds one copy (under DualPipe both stages sit on ranks 0 and pp-1)
        if 0 in stages or (pp - 1 in stages and cfg.num_nextn_predict_layers > 0):
            dense += model.embed_tokens.weight.numel()
        per_dev = dense + expert / ep
        rows.append(
            {
                "rank": r,
                "stages": "+".join(map(str, stages)),
                "layers": sum(len(ranges[s]) for s in stages),
                "params_B": (dense + expert) / 1e9,
                "params_per_device_B": per_dev / 1e9,
                "weights_bf16_GiB": 2 * per_dev / gib,
                "grads_fp32_GiB": 4 * per_dev / gib,
                "master_and_adam_GiB": 8 * (dense / (ep * dp) + expert / ep / dp) / gib,
                "total_GiB": (6 * per_dev + 8 * (dense / (ep * dp) + expert / ep / dp)) / gib,
            }
        )
    return rows


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 × activated matmul params (head and MTP included, embedding lookup excluded)
    plus causal attention 3 × 2 × H × (qk + v) × T/2 per layer."""
    r = param_report(cfg)
    active = r.activated_excl_embedding  # includes the head matmul
    if cfg.num_nextn_predict_layers:
        mtp_active = r.mtp_unique - cfg.num_nextn_predict_layers * (
            (cfg.n_routed_experts - cfg.num_experts_per_tok) * r.per_expert
        )
        active += mtp_active + cfg.num_nextn_predict_layers * r.head
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    attn = 3 * 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len / 2) * layers
    return 6 * active + attn
