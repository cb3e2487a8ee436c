"""DeepSeek-V3 decoder, MTP modules, and the cut into pipeline stage chunks.

``DeepSeekV3(cfg)(input_ids [B, T], labels [B, T] | None)`` returns a :class:`ModelOutput`:
``logits [B, T, vocab]``, ``mtp_logits[k-1] [B, T-k, vocab]`` for each depth k, the losses and the per-expert token
counts of every routing layer (main MoE layers first, then the MTP blocks) as ``expert_counts [L_route, E]``.

``labels[:, t]`` is the target of position t (the next token; ``-100`` is ignored). The main loss is the mean
cross-entropy over all positions. MTP depth k (docs/model.md §5) combines, at position i, the depth k-1 hidden state
(the main model's pre-final-norm hidden for k=1) with the embedding of token ``input_ids[:, i+k]``:
``h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_i^{k-1})])`` (embedding first, as in the released weights), runs one
full block over the T−k positions, and predicts ``labels[:, i+k]`` (the input shifted by k+1) through the shared
output head after its own final norm (``shared_head.norm``). Embedding and head are shared with the main model (the
same Parameter objects). Total loss = L_main + (λ/D)·Σ_k L_MTP^k + Σ_layers L_Bal (when α > 0).

Stage chunks (``model.stages(pp)``) reference the model's own submodules: the first chunk owns the embedding, the
last owns the final norm, head and MTP (and reuses the embedding for MTP input, which under DualPipe lives on the same
rank). Chaining the chunks runs exactly the ops of ``model.forward`` in the same order, so results are bitwise equal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from raymoe.config import ModelConfig
from raymoe.model.cache import LatentKVCache
from raymoe.model.init import init_weights
from raymoe.model.layers import RMSNorm, SwiGLU, cross_entropy
from raymoe.model.mla import MLA
from raymoe.model.moe import MoE, Router
from raymoe.model.recompute import norm_then, recompute_context
from raymoe.model.rope import RotaryEmbedding

__all__ = ["DecoderLayer", "MTPModule", "DeepSeekV3", "StageChunk", "ModelOutput", "RoutingStats", "split_layers",
           "mtp_greedy_acceptance"]


@dataclass
class RoutingStats:
    """Collects, in layer order, what each routing layer decided during one forward."""

    counts: list[torch.Tensor] = field(default_factory=list)  # [E] int64 each
    aux_losses: list[torch.Tensor] = field(default_factory=list)

    def stacked_counts(self, num_experts: int) -> torch.Tensor:
        if not self.counts:
            return torch.zeros(0, num_experts, dtype=torch.long)
        return torch.stack(self.counts)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, V]
    mtp_logits: list[torch.Tensor]  # depth k: [B, T-k, V]
    expert_counts: torch.Tensor  # [num_router_layers, E] int64
    loss: Optional[torch.Tensor] = None  # total = main + mtp + aux
    main_loss: Optional[torch.Tensor] = None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)  # unweighted L_MTP^k
    mtp_loss: Optional[torch.Tensor] = None  # (λ/D)·Σ_k L_MTP^k
    aux_loss: Optional[torch.Tensor] = None  # Σ over routing layers of the sequence-wise balance loss
    hidden: Optional[torch.Tensor] = None  # main model's pre-final-norm hidden [B, T, D]

    @property
    def mtp_mean_loss(self) -> Optional[torch.Tensor]:
        """(1/D)·Σ_k L_MTP^k, unweighted: the MTP cross-entropy comparable across runs, λ schedules and to
        validation (``mtp_loss`` is the λ-weighted term of the objective)."""
        return torch.stack(self.mtp_losses).mean() if self.mtp_losses else None


class DecoderLayer(nn.Module):
    """Pre-norm block: x + MLA(norm(x)), then + FFN(norm(·)) where FFN is dense SwiGLU or DeepSeekMoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, moe: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = MoE(cfg) if moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.is_moe = moe
        self.recompute = "none"  # none | selective | full (raymoe.model.recompute.set_recompute)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Optional[LatentKVCache] = None,
        stats: Optional[RoutingStats] = None,
    ) -> torch.Tensor:
        if self.recompute == "none" or cache is not None or not torch.is_grad_enabled():
            return self._forward(x, cos, sin, cache, stats, False)
        if self.recompute == "selective":
            return self._forward(x, cos, sin, None, stats, True)
        calls = [0]

        def run(x_: torch.Tensor) -> torch.Tensor:  # the forward, then (inside backward) its recompute
            calls[0] += 1
            if calls[0] == 1:
                return self._forward(x_, cos, sin, None, stats, False)
            with recompute_context():  # routing statistics were collected by the forward
                return self._forward(x_, cos, sin, None, None, False)

        # no early stop: the recompute must run to the end on every rank (an MoE block's all-to-alls are collectives)
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Optional[LatentKVCache],
                 stats: Optional[RoutingStats], norms_recomputed: bool) -> torch.Tensor:
        if norms_recomputed:  # the GEMMs after each norm do not keep its output (raymoe.model.recompute)
            x = x + norm_then(self.input_layernorm, x, lambda h: self.self_attn(h, cos, sin, cache))
            out = norm_then(self.post_attention_layernorm, x, self.mlp)
        else:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
            out = self.mlp(self.post_attention_layernorm(x))
        if self.is_moe:
            y, r, aux = out
            if stats is not None:
                stats.counts.append(r.counts)
                if aux is not None:
                    stats.aux_losses.append(aux)
        else:
            y = out
        return x + y


class MTPModule(nn.Module):
    """One MTP depth: enorm/hnorm, eh_proj [D, 2D], a full MoE block, and its own final norm (shared_head.norm)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = DecoderLayer(cfg, layer_idx, moe=cfg.n_routed_experts > 0)
        self.head_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, emb: torch.Tensor, h_prev: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        stats: Optional[RoutingStats] = None, cache: Optional[LatentKVCache] = None,
    ) -> torch.Tensor:
        """``cache`` (inference drafting only): the block attends through it like a main layer (its MLA's
        ``layer_idx`` is ``num_hidden_layers + depth - 1``)."""
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return self.block(h, cos, sin, cache, stats)


def split_layers(cfg: ModelConfig, pp: int, layers_per_stage: Optional[Sequence[int]] = None) -> list[range]:
    """Contiguous main-layer ranges per stage. By default MTP blocks count as layers of the last stage and the
    blocks are spread evenly with the remainder on the first stages. ``layers_per_stage`` overrides it."""
    N, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    if pp < 1:
        raise ValueError(f"pp must be >= 1, got {pp}")
    if layers_per_stage is None:
        total = N + D
        if pp > total:
            raise ValueError(f"pp={pp} exceeds the {N} layers (+{D} MTP): every stage needs at least one block")
        base, rem = divmod(total, pp)
        blocks = [base + (1 if s < rem else 0) for s in range(pp)]
        blocks[-1] -= D
        if blocks[-1] < 0:
            raise ValueError(f"pp={pp} leaves the last stage fewer blocks than MTP depth {D}")
        sizes = blocks
    else:
        sizes = list(layers_per_stage)
        if len(sizes) != pp or sum(sizes) != N or min(sizes) < 0:
            raise ValueError(
                f"layers_per_stage={sizes} must have pp={pp} non-negative entries summing to num_hidden_layers={N}"
            )
    out, start = [], 0
    for s in sizes:
        out.append(range(start, start + s))
        start += s
    return out


class DeepSeekV3(nn.Module):
    """DeepSeek-V3 causal LM: embedding → N decoder layers → norm → head (+ MTP depths)."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None, seed: Optional[int] = None) -> None:
        """Built on the meta device, then (unless ``device`` is meta) given storage on ``device`` (default: the default
        device) and the initial weights of ``seed`` (:mod:`raymoe.model.init`; None: a seed drawn from torch's global
        generator, so ``torch.manual_seed(s)`` before the call still fixes the weights)."""
        super().__init__()
        self.config = cfg
        with torch.device("meta"):
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.layers = nn.ModuleList(
                [DecoderLayer(cfg, i, moe=i >= cfg.first_k_dense_replace) for i in range(cfg.num_hidden_layers)]
            )
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            self.mtp = nn.ModuleList(
                [MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers)]
            )
            self.rotary = RotaryEmbedding(cfg)
        if device is None or torch.device(device).type != "meta":
            self.reset_parameters(seed, device)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, seed: Optional[int] = None, device: torch.device | str | None = None) -> None:
        """Normal(0, initializer_range) for every matrix (V3: 0.006), ones for norms, zero router bias, each tensor
        from its own stream of ``seed`` (:func:`raymoe.model.init.init_weights`; meta tensors get storage on
        ``device``). ``seed=None`` draws one from torch's global generator."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        init_weights(self, seed, device)

    # ------------------------------------------------------------------ helpers
    def routers(self) -> list[Router]:
        """Routers in ``expert_counts`` order: main MoE layers, then MTP blocks."""
        out = [l.mlp.router for l in self.layers if l.is_moe]
        out += [m.block.mlp.router for m in self.mtp if m.block.is_moe]
        return out

    def expert_biases(self) -> torch.Tensor:
        """``[num_router_layers, E]`` fp32 copy of every router's bias."""
        return torch.stack([r.expert_bias.detach().clone() for r in self.routers()])

    @torch.no_grad()
    def set_expert_biases(self, biases: torch.Tensor) -> None:
        routers = self.routers()
        if biases.shape != (len(routers), self.config.n_routed_experts):
            raise ValueError(f"biases must be [{len(routers)}, {self.config.n_routed_experts}], got {tuple(biases.shape)}")
        for r, b in zip(routers, biases):
            r.expert_bias.copy_(b.to(torch.float32))

    def rope(self, start: int, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(torch.arange(start, start + T, device=device))

    def run_layers(
        self,
        h: torch.Tensor,
        layer_ids: range,
        cache: Optional[LatentKVCache],
        stats: RoutingStats,
    ) -> torch.Tensor:
        if len(layer_ids) == 0:
            return h
        if cache is None:
            cos, sin = self.rope(0, h.shape[1], h.device)
        else:  # the cache knows the absolute position of every new token (paged caches: per packed token)
            cos, sin = self.rotary(cache.positions(h.shape[1], h.device))
        for i in layer_ids:
            h = self.layers[i](h, cos, sin, cache, stats)
        return h

    def head(
        self,
        h: torch.Tensor,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor],
        stats: RoutingStats,
        compute_mtp: bool,
        mtp_weight: Optional[float],
    ) -> ModelOutput:
        cfg = self.config
        logits = self.lm_head(self.norm(h))
        out = ModelOutput(logits=logits, mtp_logits=[], expert_counts=torch.zeros(0), hidden=h)
        if compute_mtp and len(self.mtp):
            h_prev, T = h, h.shape[1]
            for k, mod in enumerate(self.mtp, start=1):
                if T - k <= 0:
                    break
                cos, sin = self.rope(0, T - k, h.device)
                h_prev = mod(self.embed_tokens(input_ids[:, k:]), h_prev[:, : T - k], cos, sin, stats)
                out.mtp_logits.append(self.lm_head(mod.head_norm(h_prev)))
        out.expert_counts = stats.stacked_counts(cfg.n_routed_experts)
        if labels is not None:
            out.main_loss = cross_entropy(logits.flatten(0, 1), labels.flatten())
            total = out.main_loss
            if out.mtp_logits:
                lam = cfg.mtp_loss_weight if mtp_weight is None else mtp_weight
                out.mtp_losses = [
                    cross_entropy(lg.flatten(0, 1), labels[:, k:].flatten())
                    for k, lg in enumerate(out.mtp_logits, start=1)
                ]
                out.mtp_loss = (lam / len(self.mtp)) * torch.stack(out.mtp_losses).sum()
                total = total + out.mtp_loss
            if stats.aux_losses:
                out.aux_loss = torch.stack(stats.aux_losses).sum()
                total = total + out.aux_loss
            out.loss = total
        return out

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        *,
        cache: Optional[LatentKVCache] = None,
        compute_mtp: Optional[bool] = None,
        mtp_weight: Optional[float] = None,
    ) -> ModelOutput:
        """``input_ids [B, T]`` → :class:`ModelOutput`. With ``cache`` the absorbed MLA path is used, the tokens are
        appended at ``cache.seq_len`` and MTP is skipped unless ``compute_mtp=True``."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        stats = RoutingStats()
        h = self.embed_tokens(input_ids)
        h = self.run_layers(h, range(len(self.layers)), cache, stats)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        mtp = (cache is None) if compute_mtp is None else compute_mtp
        return self.head(h, input_ids, labels, stats, mtp, mtp_weight)

    def stages(self, pp: int, layers_per_stage: Optional[Sequence[int]] = None) -> list["StageChunk"]:
        """Cut into ``pp`` chunks sharing this model's modules (see module docstring)."""
        ranges = split_layers(self.config, pp, layers_per_stage)
        return [StageChunk(self, s, pp, r) for s, r in enumerate(ranges)]


class StageChunk(nn.Module):
    """Pipeline stage ``index`` of ``num_stages``: hidden ``[B, T, D]`` → hidden, the first from input ids, the last to
    a :class:`ModelOutput`. Side inputs (``input_ids``/``labels`` for the last chunk's MTP and loss) and the routing
    ``stats`` collector are passed by the executor; they are not pipeline activations."""

    def __init__(self, model: DeepSeekV3, index: int, num_stages: int, layer_ids: range) -> None:
        super().__init__()
        self.index, self.num_stages, self.layer_ids = index, num_stages, layer_ids
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self._model = [model]  # plain list: do not register the whole model as a submodule
        self.layers = nn.ModuleList([model.layers[i] for i in layer_ids])
        if self.is_first:
            self.embed_tokens = model.embed_tokens
        if self.is_last:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp
            if not self.is_first:
                self.mtp_embed_tokens = model.embed_tokens  # shared for real under DualPipe (same rank)

    def forward(
        self,
        x: torch.Tensor,
        *,
        input_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        stats: Optional[RoutingStats] = None,
        compute_mtp: bool = True,
        mtp_weight: Optional[float] = None,
    ) -> torch.Tensor | ModelOutput:
        model = self._model[0]
        stats = RoutingStats() if stats is None else stats
        if self.is_first:
            input_ids = x if input_ids is None else input_ids
            x = self.embed_tokens(x)
        x = model.run_layers(x, self.layer_ids, None, stats)
        if not self.is_last:
            return x
        if input_ids is None:
            raise ValueError("the last stage chunk needs input_ids (MTP input) as a side input")
        return model.head(x, input_ids, labels, stats, compute_mtp, mtp_weight)


@torch.no_grad()
def mtp_greedy_acceptance(out: ModelOutput) -> tuple[int, int]:
    """``(accepted, drafted)`` for greedy MTP drafting with teacher forcing: the depth-1 MTP head at position i
    drafts token i+2 (``mtp_logits[0][:, i]``); the target model's own greedy choice for that token is
    ``logits[:, i+1]``. A draft is accepted when the two argmaxes agree — the rule greedy speculative decoding
    applies, so training's ``eval/mtp_acceptance`` and serving's acceptance rate measure the same thing."""
    if not out.mtp_logits:
        return 0, 0
    draft = out.mtp_logits[0].argmax(-1)  # [B, T-1]
    target = out.logits[:, 1:1 + draft.shape[1]].argmax(-1)
    return int((draft == target).sum()), int(draft.numel())
