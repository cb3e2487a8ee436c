"""Typed configuration for raymoe: the single source of truth for every knob.

Dataclasses here validate and derive in ``__post_init__``; YAML under ``conf/`` only selects and overrides them (the
jobs register these classes in Hydra's ConfigStore, so a typo or a wrong type in an override fails at compose time).
Nothing in this module imports Hydra or Ray.

``ModelConfig`` uses the HuggingFace ``DeepseekV3Config`` field names wherever they exist, so that a checkpoint's
``config.json`` maps onto it one to one (see :mod:`raymoe.model.hf`). Presets are named entries:

* ``tiny``  – unit tests and ``make train`` (≈2 M parameters, 8 routed experts in 2 groups, MTP depth 1);
* ``small`` – CPU benchmarks and short real training runs (≈110 M total parameters, 32 routed experts);
* ``deepseek-v3`` – the exact 671B shapes (built on the meta device for planning only).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["RopeScaling", "ModelConfig", "ConfigError"]


class ConfigError(ValueError):
    """A configuration value or combination is invalid; the message names the field and the fix."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class RopeScaling:
    """YaRN context extension of the decoupled RoPE dims (HF ``rope_scaling``/``rope_parameters`` with type yarn).

    V3 values: factor 40, original_max_position_embeddings 4096, beta_fast 32, beta_slow 1, mscale 1, mscale_all_dim 1.
    """

    type: str = "yarn"
    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def __post_init__(self) -> None:
        _require(self.type == "yarn", f"rope_scaling.type={self.type!r} is not supported; only 'yarn' is")
        _require(self.factor >= 1.0, f"rope_scaling.factor must be >= 1, got {self.factor}")
        _require(self.original_max_position_embeddings > 0, "rope_scaling.original_max_position_embeddings must be > 0")
        _require(self.beta_fast > self.beta_slow > 0, "rope_scaling needs beta_fast > beta_slow > 0")

    def to_hf(self, rope_theta: float) -> dict[str, Any]:
        return {
            "rope_type": "yarn",
            "type": "yarn",
            "rope_theta": rope_theta,
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
            "mscale": self.mscale,
            "mscale_all_dim": self.mscale_all_dim,
        }


@dataclass
class ModelConfig:
    """DeepSeek-V3 architecture (HF field names). See techniques.md §1 for every value of the real model."""

    name: str = "custom"
    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 3
    first_k_dense_replace: int = 1
    intermediate_size: int = 256
    moe_intermediate_size: int = 64
    num_attention_heads: int = 4
    q_lora_rank: Optional[int] = 64
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 2
    topk_group: int = 1
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    initializer_range: float = 0.006
    tie_word_embeddings: bool = False
    # Loss weights owned by the model's forward (schedules by tokens live in the trainer):
    mtp_loss_weight: float = 0.3  # λ: total = L_main + (λ/D)·Σ_k L_MTP^k
    seq_aux_loss_alpha: float = 0.0  # α of the sequence-wise balance loss; 0 disables it (V3 paper: 1e-4)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        pos = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "max_position_embeddings": self.max_position_embeddings,
        }
        for k, v in pos.items():
            _require(isinstance(v, int) and v > 0, f"model.{k} must be a positive integer, got {v!r}")
        _require(
            self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
            f"model.q_lora_rank must be a positive integer or null (direct q projection), got {self.q_lora_rank!r}",
        )
        _require(
            0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            f"model.first_k_dense_replace={self.first_k_dense_replace} must be in [0, num_hidden_layers="
            f"{self.num_hidden_layers}]",
        )
        _require(self.n_shared_experts >= 0, f"model.n_shared_experts must be >= 0, got {self.n_shared_experts}")
        _require(
            self.qk_rope_head_dim % 2 == 0,
            f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)",
        )
        _require(
            self.n_routed_experts % self.n_group == 0,
            f"model.n_routed_experts={self.n_routed_experts} must be divisible by model.n_group={self.n_group}",
        )
        per_group = self.n_routed_experts // self.n_group
        _require(
            per_group >= 2,
            f"each expert group needs >= 2 experts (group score = sum of the top-2 biased scores); "
            f"n_routed_experts/n_group = {per_group}: lower model.n_group",
        )
        _require(
            self.topk_group <= self.n_group,
            f"model.topk_group={self.topk_group} must be <= model.n_group={self.n_group}",
        )
        _require(
            self.num_experts_per_tok <= self.topk_group * per_group,
            f"model.num_experts_per_tok={self.num_experts_per_tok} exceeds the experts reachable in topk_group="
            f"{self.topk_group} groups of {per_group}: raise topk_group or lower num_experts_per_tok",
        )
        _require(self.routed_scaling_factor > 0, "model.routed_scaling_factor must be > 0")
        _require(self.rms_norm_eps > 0, "model.rms_norm_eps must be > 0")
        _require(self.rope_theta > 0, "model.rope_theta must be > 0")
        _require(
            self.num_nextn_predict_layers >= 0,
            f"model.num_nextn_predict_layers (MTP depth) must be >= 0, got {self.num_nextn_predict_layers}",
        )
        _require(self.mtp_loss_weight >= 0, "model.mtp_loss_weight (λ) must be >= 0")
        _require(self.seq_aux_loss_alpha >= 0, "model.seq_aux_loss_alpha (α) must be >= 0")
        _require(self.initializer_range > 0, "model.initializer_range must be > 0")
        _require(not self.tie_word_embeddings, "model.tie_word_embeddings must be false (V3 unties embedding/head)")

    # ----------------------------------------------------------------- derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        """MoE layers of the main model (MTP blocks are counted separately, see ``num_router_layers``)."""
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def num_router_layers(self) -> int:
        """All layers that route tokens: main MoE layers + one MoE block per MTP depth."""
        return self.num_moe_layers + self.num_nextn_predict_layers

    @property
    def kv_cache_values_per_token(self) -> int:
        """Values the absorbed MLA cache keeps per token per layer: the latent plus the shared RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def yarn_mscale(self) -> float:
        """0.1·mscale_all_dim·ln(factor) + 1 (1.0 without YaRN)."""
        rs = self.rope_scaling
        if rs is None or rs.factor <= 1 or not rs.mscale_all_dim:
            return 1.0
        return 0.1 * rs.mscale_all_dim * math.log(rs.factor) + 1.0

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_nope + qk_rope) · mscale² (V3 with YaRN: 192^-0.5 · 1.8739 = 0.135234)."""
        return self.qk_head_dim**-0.5 * self.yarn_mscale**2

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ----------------------------------------------------------------- presets
    @staticmethod
    def preset(name: str) -> "ModelConfig":
        """Named configurations: ``tiny``, ``small``, ``deepseek-v3`` (also ``tiny-v2lite``: q_lora_rank=None)."""
        try:
            factory = _PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(sorted(_PRESETS))}") from None
        return factory()

    @staticmethod
    def preset_names() -> list[str]:
        return sorted(_PRESETS)


def _tiny() -> ModelConfig:
    return ModelConfig(
        name="tiny",
        vocab_size=4096,
        hidden_size=128,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_attention_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        max_position_embeddings=1024,
        num_nextn_predict_layers=1,
        initializer_range=0.02,
    )


def _tiny_v2lite() -> ModelConfig:
    return _tiny().replace(name="tiny-v2lite", q_lora_rank=None)


def _small() -> ModelConfig:
    return ModelConfig(
        name="small",
        vocab_size=8192,
        hidden_size=512,
        num_hidden_layers=8,
        first_k_dense_replace=1,
        intermediate_size=1536,
        moe_intermediate_size=256,
        num_attention_heads=8,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=32,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        max_position_embeddings=4096,
        num_nextn_predict_layers=1,
        initializer_range=0.02,
    )


def _deepseek_v3() -> ModelConfig:
    return ModelConfig(
        name="deepseek-v3",
        vocab_size=129280,
        hidden_size=7168,
        num_hidden_layers=61,
        first_k_dense_replace=3,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        rope_theta=10000.0,
        rope_scaling=RopeScaling(),
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        num_nextn_predict_layers=1,
        initializer_range=0.006,
    )


_PRESETS = {"tiny": _tiny, "tiny-v2lite": _tiny_v2lite, "small": _small, "deepseek-v3": _deepseek_v3}
