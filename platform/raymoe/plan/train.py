"""Training memory per rank, from the model config, the layout and the schedule — before anything is allocated.

What a rank holds (bytes per device)::

    weights      = P_rank · w                P_rank: this pipeline rank's parameters (its stage chunks, the routed
    gradients    = P_rank · g                experts it holds: E/ep rows of every MoE layer)
    optimizer    = (P_dense/(ep·dp) + P_expert/dp) · (m + 2·μ)     ZeRO-1 (unsharded: P_rank · (m + 2·μ))
    activations  = peak over the rank's op list of Σ_{in-flight F} A(stage)   (+ a recompute / loss workspace)

``P_rank`` comes from the runtime's own :class:`~raymoe.train.topology.Topology` (the names each pipeline rank
holds) and the model built on the meta device, so the plan and the runtime cannot disagree about who holds what.
ZeRO-1 splits each tensor's optimizer state over the ranks that hold the same tensor: the ``ep × dp`` ranks of a
pipeline rank for dense parameters (attention, dense FFNs, shared experts, routers, norms, embedding, head), the
``dp`` replicas of a shard for routed experts (expert parallelism is carved out of data parallelism, see
:mod:`raymoe.train.topology`).

Precisions (:data:`PRECISIONS`, bytes per value ``w / g / m / μ`` and activations):

* ``fp32``  — the CPU runtime with ``train.dtype=float32``: fp32 parameters, gradients and AdamW moments;
* ``bf16``  — ``train.dtype=bfloat16``: the same fp32 parameters (they are the master weights), bf16 activations;
* ``v3-fp8`` — the V3 report's recipe (§3.3): BF16 weights, FP32 gradients, FP32 master weights, BF16 AdamW moments;
  activations in BF16 except the inputs of the FP8 GEMMs (linear inputs, the dispatched tokens, the SwiGLU
  inputs), cached in FP8 (1 B; V3 keeps the attention output in a custom E5M6 format, counted here as FP8 too).

Activations. ``A(stage)`` = micro-batch tokens × Σ over the stage's blocks of the per-token values the backward
needs (:func:`layer_activation_values`, one table per block kind), which depend on the recompute setting:

* ``none``: every saved tensor — layer input, RMSNorm outputs, the MLA down- and up-projection outputs (q, k, v), the
  attention output and its log-sum-exp (a fused attention kernel: no T² scores), the router scores and top-k
  weights, the K dispatched copies of each token, the SwiGLU inputs and outputs of the routed and shared experts;
* ``selective`` (V3 §3.3.1): RMSNorm outputs and MLA up-projections recomputed in backward, and the SwiGLU output
  recomputed from its cached inputs; the router's gate weights are applied inside the expert (to the SwiGLU
  output), so the combine saves nothing;
* ``full``: only each block's input is kept; the block is recomputed in backward.

The number of micro-batches in flight comes from walking the schedule's op list (an ``F`` adds its stage's
activations, a ``B``/``Bi`` frees them, an ``F&B`` pair runs its forward first), so 1F1B holds ``PP - r`` chunks
on rank ``r`` and DualPipe ``PP + 1`` (a mix of its two stages), exactly as :mod:`raymoe.schedule` simulates. On
top: recomputing ranks need one block's full activations for one micro-batch while its backward runs, and the
rank holding the last stage needs the logits of one micro-batch (main head and every MTP depth, activation dtype)
plus one FP32 copy for the cross-entropy backward. Not modelled: temporary GEMM buffers, communication buffers,
the allocator's fragmentation — :attr:`Cluster.reserve_GiB` sets memory aside for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from raymoe.config import ConfigError, ModelConfig

__all__ = ["Precision", "PRECISIONS", "RECOMPUTE", "Cluster", "TrainLayout", "RankMemory", "TrainPlan",
           "layer_activation_values", "rank_parameters", "plan_training", "GiB"]

GiB = 1024**3
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Precision:
    """Bytes per value: weight ``w``, gradient ``g``, master copy ``m`` (0: the weights are the master copy), each
    AdamW moment ``mu``; activations ``act``; cached GEMM inputs ``gemm_in`` (FP8 caching: 1)."""

    name: str
    w: float
    g: float
    m: float
    mu: float
    act: float
    gemm_in: float

    @property
    def optimizer(self) -> float:
        """Optimizer-state bytes per parameter: master copy + two moments."""
        return self.m + 2 * self.mu


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", w=4, g=4, m=0, mu=4, act=4, gemm_in=4),
    "bf16": Precision("bf16", w=4, g=4, m=0, mu=4, act=2, gemm_in=2),
    "v3-fp8": Precision("v3-fp8", w=2, g=4, m=4, mu=2, act=2, gemm_in=1),
}


@dataclass
class Cluster:
    """The hardware: ``num_nodes × gpus_per_node`` devices of ``gpu_memory_GiB`` each; ``reserve_GiB`` per device is
    set aside for what the plan does not model (CUDA context, communication buffers, fragmentation)."""

    name: str = "custom"
    num_nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_GiB: float = 79.6
    reserve_GiB: float = 4.0

    def __post_init__(self) -> None:
        if self.num_nodes < 1 or self.gpus_per_node < 1:
            raise ConfigError(f"cluster.num_nodes and cluster.gpus_per_node must be >= 1, got {self.num_nodes}, "
                              f"{self.gpus_per_node}")
        if not 0 <= self.reserve_GiB < self.gpu_memory_GiB:
            raise ConfigError(f"cluster.reserve_GiB={self.reserve_GiB} must be in [0, gpu_memory_GiB="
                              f"{self.gpu_memory_GiB})")

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node


@dataclass
class TrainLayout:
    """A training layout. ``dp=None``: whatever the cluster leaves, ``num_gpus / (pp · ep)``.
    ``num_microbatches=0``: the schedule's minimum (1F1B: ``pp``; DualPipe/DualPipeV: ``2 pp``)."""

    pp: int = 1
    ep: int = 1
    dp: Optional[int] = None
    schedule: str = "1f1b"
    num_microbatches: int = 0
    micro_batch_size: int = 1
    seq_len: int = 4096
    recompute: str = "none"
    zero1: bool = True
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"layout.recompute={self.recompute!r}; allowed: {', '.join(RECOMPUTE)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"layout.precision={self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if self.micro_batch_size < 1 or self.seq_len < 1:
            raise ConfigError(f"layout.micro_batch_size and layout.seq_len must be >= 1, got "
                              f"{self.micro_batch_size}, {self.seq_len}")

    def resolved(self, cluster: Optional[Cluster]) -> "TrainLayout":
        """A copy with ``dp`` and ``num_microbatches`` filled in."""
        dp = self.dp
        if dp is None:
            if cluster is None:
                dp = 1
            else:
                if cluster.num_gpus % (self.pp * self.ep):
                    raise ConfigError(f"the cluster's {cluster.num_gpus} GPUs are not a multiple of layout.pp × "
                                      f"layout.ep = {self.pp * self.ep}; set layout.dp or change the cluster")
                dp = cluster.num_gpus // (self.pp * self.ep)
        C = self.num_microbatches
        if C == 0:
            C = 2 * self.pp if self.schedule in ("dualpipe", "dualpipev") and self.pp > 1 else self.pp
        return TrainLayout(self.pp, self.ep, dp, self.schedule, C, self.micro_batch_size, self.seq_len,
                           self.recompute, self.zero1, self.precision)


# ------------------------------------------------------------------------------------------------ activations
# (name, values per token, dtype class, kept under selective recompute). Dtype classes: "a" activation dtype,
# "g" input of a GEMM (FP8-cached under v3-fp8), "f" fp32. Under full recompute only the block input is kept.
_Item = tuple[str, int, str, bool]


def _attention_items(cfg: ModelConfig) -> list[_Item]:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk, v = cfg.qk_head_dim, cfg.v_head_dim
    items: list[_Item] = [("attn.input", D, "a", True), ("attn.norm_out", D, "g", False)]
    if cfg.q_lora_rank is not None:
        items += [("q_a", cfg.q_lora_rank, "a", True), ("q_a_norm_out", cfg.q_lora_rank, "g", False)]
    items += [
        ("kv_a", cfg.kv_lora_rank + cfg.qk_rope_head_dim, "a", True),
        ("kv_a_norm_out", cfg.kv_lora_rank, "g", False),
        ("q", H * qk, "a", False), ("k", H * qk, "a", False), ("v", H * v, "a", False),  # up-projections
        ("attn.out", H * v, "g", True), ("attn.lse", H, "f", True),
    ]
    return items


def _ffn_items(cfg: ModelConfig, moe: bool) -> list[_Item]:
    D = cfg.hidden_size
    items: list[_Item] = [("ffn.input", D, "a", True), ("ffn.norm_out", D, "g", False)]
    if not moe:
        I = cfg.intermediate_size
        return items + [("ffn.gate_up", 2 * I, "g", True), ("ffn.act", I, "g", False)]
    E, K, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    S = cfg.n_shared_experts * I
    items += [
        ("router.scores", E, "f", True), ("router.topk", 2 * K, "f", True),  # weights + indices
        ("experts.input", K * D, "g", True),  # the K dispatched copies of the token
        ("experts.gate_up", 2 * K * I, "g", True), ("experts.act", K * I, "g", False),
    ]
    if S:
        items += [("shared.gate_up", 2 * S, "g", True), ("shared.act", S, "g", False)]
    return items


def layer_activation_values(cfg: ModelConfig, kind: str, recompute: str, prec: Precision) -> float:
    """Bytes per token one block keeps for its backward. ``kind``: ``dense`` | ``moe`` | ``mtp`` (an MTP depth:
    its two input norms, ``eh_proj`` and a MoE block) | ``head`` (final norm + head input, per head)."""
    D = cfg.hidden_size
    if kind == "head":
        items: list[_Item] = [("head.norm_in", D, "a", True), ("head.norm_out", D, "g", False)]
    else:
        items = []
        if kind == "mtp":
            items += [("mtp.norm_in", 2 * D, "a", True), ("mtp.eh_in", 2 * D, "g", False)]
        items += _attention_items(cfg) + _ffn_items(cfg, moe=kind != "dense")
    if recompute == "full":
        items = items[:1]  # the block input
    elif recompute == "selective":
        items = [it for it in items if it[3]]
    size = {"a": prec.act, "g": prec.gemm_in, "f": 4.0}
    return sum(n * size[c] for _, n, c, _ in items)


# ------------------------------------------------------------------------------------------------ parameters
def _is_routed_expert(name: str) -> bool:
    return ".experts." in f".{name}" and "shared_experts" not in name


def rank_parameters(cfg: ModelConfig, topo) -> list[tuple[int, int]]:
    """Per pipeline rank ``(dense, routed_expert)`` parameters one device holds (experts: its ``E/ep`` rows)."""
    from raymoe.model.transformer import DeepSeekV3

    sizes = {n: p.numel() for n, p in DeepSeekV3(cfg, device="meta").named_parameters()}
    out = []
    for p in range(topo.pp):
        names = topo.param_names(p)
        dense = sum(sizes[n] for n in names if not _is_routed_expert(n))
        expert = sum(sizes[n] for n in names if _is_routed_expert(n))
        out.append((dense, expert // topo.ep))
    return out


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class RankMemory:
    """One pipeline rank's device (every ``ep × dp`` device of a pipeline rank holds the same amounts). Bytes."""

    pp_rank: int
    stages: list[int]
    blocks: int  # decoder layers + MTP blocks across its stages
    params: int
    dense_params: int
    expert_params: int
    weights: float
    grads: float
    optimizer: float
    optimizer_unsharded: float
    in_flight: float  # peak in-flight micro-batch chunks (chunk units, as raymoe.schedule.simulate counts)
    activations: float
    workspace: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.workspace

    @property
    def total_unsharded(self) -> float:
        return self.total - self.optimizer + self.optimizer_unsharded


@dataclass
class TrainPlan:
    model: ModelConfig
    layout: TrainLayout  # resolved: dp and num_microbatches set
    cluster: Cluster
    ranks: list[RankMemory] = field(default_factory=list)
    ep_nodes: int = 1  # nodes one ep group spans under the runtime's rank numbering

    @property
    def budget(self) -> float:
        """Bytes per device the plan may use: GPU memory minus the reserve."""
        return (self.cluster.gpu_memory_GiB - self.cluster.reserve_GiB) * GiB

    @property
    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total)

    @property
    def margin(self) -> float:
        """Bytes left on the fullest device (negative: over by that much)."""
        return self.budget - self.worst.total

    @property
    def fits(self) -> bool:
        return self.margin >= 0

    @property
    def margin_unsharded(self) -> float:
        return self.budget - max(r.total_unsharded for r in self.ranks)


def _stage_kinds(cfg: ModelConfig, num_stages: int) -> list[list[str]]:
    from raymoe.model.transformer import split_layers

    kinds = []
    for s, rng in enumerate(split_layers(cfg, num_stages)):
        ks = ["dense" if i < cfg.first_k_dense_replace else "moe" for i in rng]
        if s == num_stages - 1:
            ks += ["mtp"] * cfg.num_nextn_predict_layers + ["head"] * (1 + cfg.num_nextn_predict_layers)
        kinds.append(ks)
    return kinds


def _peak(ops, chunk_bytes: list[float]) -> tuple[float, float]:
    """(peak bytes, peak chunk count) of live forward activations along one rank's op list."""
    live = peak = n = peak_n = 0.0
    for op in ops:
        for p in op.parts:
            kind = p.kind.name
            if kind == "F":
                live, n = live + chunk_bytes[p.stage], n + 1
            elif kind in ("B", "BI"):
                live, n = live - chunk_bytes[p.stage], n - 1
            peak, peak_n = max(peak, live), max(peak_n, n)
    return peak, peak_n


def plan_training(cfg: ModelConfig, layout: TrainLayout, cluster: Optional[Cluster] = None) -> TrainPlan:
    """Per pipeline rank memory of ``layout`` on ``cluster`` (see the module docstring for every term).

    Raises:
        ConfigError: a layout the runtime's :class:`~raymoe.train.topology.Topology` refuses, or one that does not
            use the cluster's GPUs exactly.
    """
    from raymoe.train.topology import Topology

    cluster = cluster or Cluster(num_nodes=1, gpus_per_node=layout.pp * layout.ep * (layout.dp or 1))
    L = layout.resolved(cluster)
    world = L.pp * L.ep * L.dp
    if world != cluster.num_gpus:
        raise ConfigError(f"layout pp×ep×dp = {L.pp}×{L.ep}×{L.dp} = {world} ranks, but the cluster has "
                          f"{cluster.num_gpus} GPUs ({cluster.num_nodes} nodes × {cluster.gpus_per_node})")
    topo = Topology(L.pp, L.ep, L.dp, L.schedule, L.num_microbatches, cfg)
    prec = PRECISIONS[L.precision]
    tokens = L.micro_batch_size * L.seq_len
    kinds = _stage_kinds(cfg, topo.num_stages)
    chunk_bytes = [tokens * sum(layer_activation_values(cfg, k, L.recompute, prec) for k in ks if k != "head")
                   + tokens * ks.count("head") * layer_activation_values(cfg, "head", L.recompute, prec)
                   for ks in kinds]
    block_none = max(layer_activation_values(cfg, k, "none", prec) for k in ("dense", "moe", "mtp")
                     if k != "moe" or cfg.num_moe_layers > 0)
    logits = tokens * cfg.vocab_size * ((1 + cfg.num_nextn_predict_layers) * prec.act + 4)
    plan = TrainPlan(cfg, L, cluster)
    plan.ep_nodes = len({r // cluster.gpus_per_node for r in topo.ep_group(0)})
    for p, (dense, expert) in enumerate(rank_parameters(cfg, topo)):
        stages = sorted({s for s, _ in topo.schedule.chunks(p)})
        acts, n = _peak(topo.schedule.ops(p), chunk_bytes)
        work = (tokens * block_none if L.recompute != "none" else 0.0)
        if topo.num_stages - 1 in stages:
            work += logits
        params = dense + expert
        sharded = dense / (L.ep * L.dp) + expert / L.dp if L.zero1 else params
        plan.ranks.append(RankMemory(
            pp_rank=p, stages=stages,
            blocks=sum(k in ("dense", "moe", "mtp") for s in stages for k in kinds[s]),
            params=params, dense_params=dense, expert_params=expert,
            weights=params * prec.w, grads=params * prec.g,
            optimizer=sharded * prec.optimizer, optimizer_unsharded=params * prec.optimizer,
            in_flight=n, activations=acts, workspace=work,
        ))
    return plan


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


