"""Serving memory per GPU of a deployment unit (replica), from the model config and the layout.

A deployment unit of ``num_nodes × gpus_per_node`` GPUs splits the model the way DeepSeek and SGLang deploy V3:

* **attention side** — MLA, the dense FFNs of the first ``first_k_dense_replace`` layers, the embedding and the
  head: sharded ``attention_tp`` ways (tensor parallel inside a group) and replicated over the
  ``gpus / attention_tp`` attention-DP groups; norms and routers on every GPU;
* **shared experts** — with the attention (on every GPU, ``/attention_tp``), or, with ``shared_expert_slots > 0``,
  as that many extra expert slots per layer among the routed ones (the paper's decode: 64 GPUs host redundant and
  shared experts);
* **routed experts** — ``E + redundant_experts + shared_expert_slots`` slots per MoE layer over all GPUs of the unit
  (expert parallelism ``ep`` = the GPU count): ``ceil(slots / gpus)`` experts per GPU and layer.

Weights in ``fp8`` (V3's released checkpoint): every GEMM weight 1 B plus one FP32 scale per 128×128 block; the
embedding, head, norms and routers in BF16. The MTP module (one MoE block, ``eh_proj``) is loaded when ``mtp`` is set
(speculative decoding). KV cache: the absorbed MLA cache keeps ``kv_lora_rank + qk_rope_head_dim`` values per token
per layer (:attr:`ModelConfig.kv_cache_values_per_token`, 576 for V3); the latent is shared by every head, so a
tensor-parallel attention group keeps a full copy on each of its GPUs. Sequences per GPU = what is left of the GPU
after the weights and the cluster's reserve (activations, communication buffers, CUDA graphs), over one sequence's
cache at ``context_len`` tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from raymoe.config import ConfigError, ModelConfig
from raymoe.plan.train import GiB, Cluster

__all__ = ["ServeLayout", "ServePlan", "plan_serving", "serve_weight_bytes"]

_FP8_BLOCK = 128


@dataclass
class ServeLayout:
    """One deployment unit. ``num_nodes=0``: the whole cluster."""

    phase: str = "decode"  # prefill | decode (reported; the memory rules are the same)
    num_nodes: int = 0
    attention_tp: int = 1
    redundant_experts: int = 0
    shared_expert_slots: int = 0
    weight_dtype: str = "fp8"  # fp8 | bf16 | fp32
    kv_bytes: float = 2.0  # per cached value (BF16)
    context_len: int = 4096
    mtp: bool = True

    def __post_init__(self) -> None:
        if self.phase not in ("prefill", "decode"):
            raise ConfigError(f"layout.phase={self.phase!r}; allowed: prefill, decode")
        if self.weight_dtype not in ("fp8", "bf16", "fp32"):
            raise ConfigError(f"layout.weight_dtype={self.weight_dtype!r}; allowed: fp8, bf16, fp32")
        if self.attention_tp < 1 or self.num_nodes < 0 or self.context_len < 1:
            raise ConfigError(f"layout.attention_tp >= 1, layout.num_nodes >= 0 and layout.context_len >= 1 needed; "
                              f"got {self.attention_tp}, {self.num_nodes}, {self.context_len}")
        if self.redundant_experts < 0 or self.shared_expert_slots < 0:
            raise ConfigError("layout.redundant_experts and layout.shared_expert_slots must be >= 0")


def serve_weight_bytes(numel: int, gemm: bool, dtype: str, shape: Optional[tuple[int, ...]] = None) -> float:
    """Bytes of one weight: GEMM weights in ``fp8`` cost 1 B + an FP32 scale per 128×128 block (of its last two
    dims); everything else BF16 under ``fp8``."""
    if dtype == "fp32":
        return 4.0 * numel
    if dtype == "bf16" or not gemm:
        return 2.0 * numel
    if shape is None or len(shape) < 2:
        return numel * (1 + 4 / _FP8_BLOCK**2)
    lead = math.prod(shape[:-2])
    blocks = lead * math.ceil(shape[-2] / _FP8_BLOCK) * math.ceil(shape[-1] / _FP8_BLOCK)
    return numel + 4.0 * blocks


@dataclass
class ServePlan:
    model: ModelConfig
    layout: ServeLayout
    cluster: Cluster
    gpus: int
    experts_per_gpu: int  # routed (and redundant / shared) expert slots per GPU per MoE layer
    attention_weights: float  # bytes per GPU: attention side (/tp) + norms + routers (+ shared experts)
    expert_weights: float  # bytes per GPU: its expert slots over every MoE layer
    kv_per_sequence: float  # bytes of one sequence's cache at context_len
    replica_weights: float  # bytes of weights across the unit

    @property
    def weights(self) -> float:
        return self.attention_weights + self.expert_weights

    @property
    def budget(self) -> float:
        return (self.cluster.gpu_memory_GiB - self.cluster.reserve_GiB) * GiB

    @property
    def kv_room(self) -> float:
        """Bytes per GPU left for the KV cache (negative: the weights alone do not fit)."""
        return self.budget - self.weights

    @property
    def sequences_per_gpu(self) -> int:
        return max(0, int(self.kv_room // self.kv_per_sequence))

    @property
    def sequences_per_replica(self) -> int:
        return self.sequences_per_gpu * (self.gpus // self.layout.attention_tp)

    @property
    def fits(self) -> bool:
        """The weights fit and at least one sequence of ``context_len`` tokens has room."""
        return self.sequences_per_gpu >= 1

    @property
    def margin(self) -> float:
        """Bytes left after the weights and one sequence's cache."""
        return self.kv_room - self.kv_per_sequence


def plan_serving(cfg: ModelConfig, layout: ServeLayout, cluster: Cluster) -> ServePlan:
    """Memory per GPU of one deployment unit (see the module docstring).

    Raises:
        ConfigError: a unit larger than the cluster, or an attention TP degree that does not divide its GPUs.
    """
    from raymoe.model.transformer import DeepSeekV3

    nodes = layout.num_nodes or cluster.num_nodes
    if nodes > cluster.num_nodes:
        raise ConfigError(f"layout.num_nodes={nodes} exceeds the cluster's {cluster.num_nodes} nodes")
    gpus = nodes * cluster.gpus_per_node
    tp = layout.attention_tp
    if gpus % tp:
        raise ConfigError(f"layout.attention_tp={tp} must divide the unit's {gpus} GPUs")
    E = cfg.n_routed_experts
    slots = E + layout.redundant_experts + layout.shared_expert_slots
    per_gpu = math.ceil(slots / gpus)
    model = DeepSeekV3(cfg, device="meta")
    if not layout.mtp:
        model.mtp = type(model.mtp)()
    dt = layout.weight_dtype
    attn = experts = replica = 0.0
    expert_layers = 0
    for name, p in model.named_parameters():
        gemm = p.dim() >= 2 and "embed_tokens" not in name and "lm_head" not in name and "router" not in name
        b = serve_weight_bytes(p.numel(), gemm, dt, tuple(p.shape))
        if ".experts." in f".{name}" and "shared_experts" not in name:
            per_expert = b / p.shape[0]
            experts += per_gpu * per_expert
            replica += slots * per_expert
            expert_layers += name.endswith("gate_proj")
        elif "shared_experts" in name and layout.shared_expert_slots:
            continue  # a shared expert occupies expert slots like a routed one (same size): counted with them
        elif "router" in name or p.dim() < 2:
            attn += b
            replica += b * gpus
        else:
            attn += b / tp
            replica += b * gpus / tp
    kv = cfg.kv_cache_values_per_token * (cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if layout.mtp else 0))
    return ServePlan(cfg, layout, cluster, gpus, per_gpu, attn, experts,
                     kv * layout.kv_bytes * layout.context_len, replica)
