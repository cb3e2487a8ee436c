"""The inference engine: continuous batching over a paged latent KV cache, on the training model's own modules.

``LLMEngine.from_pretrained(dir)`` loads a HF DeepseekV3 checkpoint with :func:`raymoe.model.hf.load` (and
``dir/tokenizer.json`` with ``tokenizers``); there is no second model implementation. One ``step()``:

1. the :class:`~raymoe.engine.scheduler.Scheduler` picks, under a token budget, decode tokens (+ MTP drafts) of the
   running sequences, prefill chunks, and newly admitted sequences (see its docstring for the policy);
2. all picked tokens are packed into one row ``[1, N]`` and run through ``model.embed_tokens`` →
   ``model.run_layers(..., cache=PackedBatch)`` (absorbed MLA reading/writing the paged cache, see
   :mod:`raymoe.engine.paged`) → ``model.norm`` → ``model.lm_head`` on the rows that need logits only.
   **Decode fast path**: when every sequence contributes at most ``1 + num_speculative_tokens`` tokens (decode, draft
   verification; ``EngineConfig.fast_decode``), the tokens run instead as ``[N, 1]`` — one batch row per token —
   with a :class:`~raymoe.engine.paged.DecodeBatch`, so each token attends to its own sequence's latents only
   (``O(Σ len)`` attention instead of the packed ``O(N·Σ len)``); every other op sees the same ``[N, D]`` rows.
   Routed experts run fused (``EngineConfig.fused_experts``, :func:`raymoe.model.moe.fuse_gate_up`): gate and up
   in one ``[E, 2I, D]`` tensor, two GEMMs per touched expert; linears with ``out ≥ in`` keep their weight as
   ``[in, out]`` (``EngineConfig.kn_linears``, :func:`raymoe.model.layers.kn_layout`), the faster GEMM at few rows.
   On an fp32 CPU model ``EngineConfig.cpu_kernels`` (``auto``, default) replaces the few-row products instead with
   :mod:`raymoe.model.cpu_kernels`: dense linears through panel-packed copies, each MoE layer's routing, dispatch,
   experts and combine in one call, the absorbed decode attention read in place from the paged cache
   (:meth:`~raymoe.engine.paged.DecodeBatch.attend_absorbed`), RMSNorm; prefill-sized products keep torch's GEMMs;
3. per sequence: sample (prefill's last chunk, decode) or verify drafts (speculative), apply stop conditions; the
   greedy tokens of all sequences come from one ``argmax`` over the step's logits, after one
   :func:`~raymoe.engine.sampling.process_logits` call over the rows of requests with logits processors
   (``logit_bias``, ``min_tokens``, penalties, ``min_p``; those requests are never drafted);
4. MTP drafting (``num_speculative_tokens = k > 0`` and the model has MTP modules): for every sequence, the MTP
   block (depth 1) runs over the positions whose next token is now known — ``[emb(t_{i+1}) ; h_i]`` at position i,
   attending through its own paged layer — and its head proposes the token after the last one; drafts 2..k chain the
   same module on its own output hidden state. Drafts are verified in the next step's single target forward
   (``[t_last, d_1..d_k]`` at positions ``c..c+k``); the cache then keeps positions up to the last accepted one
   (rejected positions are simply overwritten later).

Prefix caching (``EngineConfig.enable_prefix_caching``, on by default as in vLLM): full cache blocks are shared
between requests with a common token prefix and kept after a request ends, so a request prefills only what no
cached block holds (:mod:`raymoe.engine.paged` for the digests and the LRU pool, :mod:`raymoe.engine.scheduler` for
reuse and registration). Reused blocks hold exactly what this engine would compute for them, so outputs do not
change (greedy outputs are tested equal with the cache on and off). ``RequestOutput.num_cached_tokens`` is the
prompt tokens a request reused (OpenAI's ``usage.prompt_tokens_details.cached_tokens``); ``metrics()`` reports the hit
rate (reused / prompt tokens over admitted sequences) and the cached blocks.

Seeded sampling draws from one ``torch.Generator`` per sequence; the draws a sequence makes depend only on its own
tokens (drafting starts after its first generated token, whatever the prefill chunking), so a seeded request gives
the same output alone or in any batch. Exceptions: a sequence preempted (recomputed) while speculating, or one whose
drafts were dropped because other decodes filled the step's token budget, may continue on a different stream
(greedy output is never affected).

Outputs are :class:`RequestOutput` snapshots (cumulative token ids and stable text per choice) for every request
that progressed, so a server can stream deltas. ``generate()`` runs requests to completion.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import pathlib
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence as Seq

import torch
from torch import nn

from raymoe.engine.detokenize import IncrementalDetokenizer
from raymoe.engine.experts import ExpertBackend, install_expert_backend
from raymoe.model.layers import enable_fused_weight_cache, use_kn_layout, use_native_linears
from raymoe.model.mla import MLA
from raymoe.model.moe import fuse_gate_up
from raymoe.engine.paged import DecodeBatch, PackedBatch, PagedLatentCache, PrefillBatch
from raymoe.engine.sampling import (SamplingParams, probs_from_logits, process_logits, sample_token, speculative_accept,
                                    top_logprobs)
from raymoe.engine.scheduler import Scheduler, Sequence, SequenceGroup
from raymoe.model.transformer import DeepSeekV3, RoutingStats

__all__ = ["EngineConfig", "LLMEngine", "RequestOutput", "CompletionOutput", "EngineError", "EngineFull",
           "load_tokenizer"]

log = logging.getLogger(__name__)


class EngineError(ValueError):
    """A request the engine cannot take (too long, bad parameters): ``code`` is an HTTP status, ``error_code``
    OpenAI's machine-readable code (``context_length_exceeded``) or None."""

    def __init__(self, message: str, param: Optional[str] = None, code: int = 400,
                 error_code: Optional[str] = None) -> None:
        super().__init__(message)
        self.param, self.code, self.error_code = param, code, error_code


class EngineFull(RuntimeError):
    """The waiting queue is at its bound (the server answers 503/429)."""


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int = 1024
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    prefill_chunk: int = 256
    max_model_len: Optional[int] = None  # default: the model's max_position_embeddings
    num_speculative_tokens: int = 0  # MTP drafts per step (needs MTP modules); 0 = off
    max_waiting: int = 1024  # bound on queued sequences
    dtype: str = "float32"
    device: str = "cpu"
    fast_decode: bool = True  # decode / draft-verify steps use the per-token DecodeBatch attention (see module doc)
    fast_prefill_max_mib: int = 256  # prefill steps use it too when cheaper and its gathered keys fit this (MiB)
    # (expanded_prefill off only: the row layout or the packed one then carries prefill chunks absorbed)
    expanded_prefill: bool = True  # prefill chunks attend through expanded per-head K/V (PrefillBatch; module doc)
    seed: int = 0  # seeds requests that bring no seed of their own (in order of arrival)
    enable_prefix_caching: bool = True  # share / keep full blocks of common prompt prefixes (module docstring)
    fused_experts: bool = True  # routed experts' gate/up held as one [E, 2I, D] tensor: 2 GEMMs per touched expert
    kn_linears: bool = True  # linears with out >= in hold their weight as [in, out] (x @ W; layers.kn_layout)
    # few-row products (decode) through raymoe.model.cpu_kernels: "auto" when built and the model is fp32 on CPU
    # (kn_linears then does not apply), "on" (an error if they cannot be used), "off"
    cpu_kernels: str = "auto"

    def __post_init__(self) -> None:
        # each would leave the step loop spinning with nothing schedulable, every request hanging
        for k in ("block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens", "prefill_chunk"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"engine.{k} must be an integer >= 1, got {v!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"engine.max_model_len must be an integer >= 2 or null, got {self.max_model_len!r}")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 0:
            raise ValueError(f"engine.num_speculative_tokens must be an integer >= 0, got "
                             f"{self.num_speculative_tokens!r}")
        for k in ("expanded_prefill", "fused_experts", "kn_linears", "enable_prefix_caching"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"engine.{k} must be true or false, got {getattr(self, k)!r}")
        if isinstance(self.cpu_kernels, bool):  # YAML 1.1 reads a bare on / off as a boolean
            self.cpu_kernels = "on" if self.cpu_kernels else "off"
        if self.cpu_kernels not in ("auto", "on", "off"):
            raise ValueError(f"engine.cpu_kernels must be one of auto, on, off; got {self.cpu_kernels!r}")
        if not isinstance(self.max_waiting, int) or self.max_waiting < 0:
            raise ValueError(f"engine.max_waiting must be an integer >= 0, got {self.max_waiting!r}")

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> "EngineConfig":
        d = dict(d or {})
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown engine options {sorted(unknown)}")
        return cls(**known)


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: Optional[str]
    logprobs: Optional[list[dict[str, Any]]] = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict[str, float] = field(default_factory=dict)
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache (choice 0's first admission)
    error: Optional[str] = None  # the request failed (its own sampling / detokenization / stop handling): why


def load_tokenizer(path: str | pathlib.Path):
    """``tokenizer.json`` (a file or a directory holding one) → ``tokenizers.Tokenizer``."""
    import tokenizers

    p = pathlib.Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.exists():
        raise FileNotFoundError(f"no tokenizer.json at {p}")
    return tokenizers.Tokenizer.from_file(str(p))


def _eos_id(model_dir: Optional[pathlib.Path], tokenizer) -> Optional[int]:
    if model_dir is not None:
        for name in ("generation_config.json", "config.json"):
            f = model_dir / name
            if f.exists():
                eos = json.loads(f.read_text()).get("eos_token_id")
                if isinstance(eos, list):
                    eos = eos[0] if eos else None
                if isinstance(eos, int):
                    return eos
    if tokenizer is not None:
        for tok in ("<|endoftext|>", "</s>", "<｜end▁of▁sentence｜>"):
            i = tokenizer.token_to_id(tok)
            if i is not None:
                return i
    return None


class LLMEngine:
    def __init__(self, model: DeepSeekV3, tokenizer=None, config: Optional[EngineConfig] = None,
                 eos_token_id: Optional[int] = None, expert_backend: Optional[ExpertBackend] = None) -> None:
        """Takes ownership of ``model``: it is put in eval mode and its MoE layers are wrapped (outputs unchanged)
        so routed experts go through ``expert_backend`` (default: local)."""
        cfg = config or EngineConfig()
        self.config = cfg
        self.model = model.eval()
        self.model_config = model.config
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.device = torch.device(cfg.device)
        self.cpu_kernels = self._use_cpu_kernels(cfg)
        if cfg.fused_experts:  # before the backend copies experts into shards (they inherit it)
            fuse_gate_up(self.model, native=self.cpu_kernels)
        self.expert_backend = install_expert_backend(self.model, expert_backend)
        # the engine never trains: keep fused weights
        enable_fused_weight_cache(self.model, kn=cfg.kn_linears, native=self.cpu_kernels)
        if self.cpu_kernels:
            use_native_linears(self.model)
            for m in self.model.modules():
                if isinstance(m, MLA):
                    m.native = True  # decode rows' RoPE in one kernel call
        elif cfg.kn_linears:  # kv_b_proj's weight is read per head ([H, N+V, C] views) by the absorbed attention
            use_kn_layout(self.model, skip=("kv_b_proj",))
        mc = model.config
        self.max_model_len = cfg.max_model_len or mc.max_position_embeddings
        self.num_spec = cfg.num_speculative_tokens if len(model.mtp) > 0 else 0
        if cfg.num_speculative_tokens and not len(model.mtp):
            log.warning("num_speculative_tokens=%d but the model has no MTP modules: speculation off",
                        cfg.num_speculative_tokens)
        n_layers = mc.num_hidden_layers + (1 if self.num_spec else 0)
        self.cache = PagedLatentCache(n_layers, cfg.num_blocks, cfg.block_size, mc.kv_lora_rank + mc.qk_rope_head_dim,
                                      dtype=next(model.parameters()).dtype, device=self.device)
        self.cache.cpu_kernels = self.cpu_kernels  # decode attention reads the cache in place (paged.DecodeBatch)
        # with MTP drafting the MTP layer's latent at a block's last slot depends on the next block's first token
        self.scheduler = Scheduler(self.cache, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.prefill_chunk,
                                   prefix_caching=cfg.enable_prefix_caching, lookahead=1 if self.num_spec else 0)
        self.groups: dict[str, SequenceGroup] = {}
        self._seed_rng = random.Random(cfg.seed)
        self._req_counter = itertools.count()
        self.stats: dict[str, float] = dict(steps=0, prompt_tokens=0, generation_tokens=0, spec_drafted=0,
                                            spec_accepted=0, spec_verifies=0, spec_emitted=0)
        # forwards (main and MTP) per cache view: "decode" = DecodeBatch fast path, "packed" = PackedBatch,
        # "prefill" = PrefillBatch (expanded prefill chunks + absorbed short segments)
        self.forward_paths: dict[str, int] = {"decode": 0, "packed": 0, "prefill": 0}
        # segments of at most this many tokens take the decode fast path (a decode token + its drafts)
        self.fast_decode_max_tokens = 1 + self.num_spec
        # request id -> why it failed; each failure ends only its own request (see step)
        self.failed: dict[str, str] = {}
        # a seam for tests: called with each sequence before its per-sequence step work (an exception there is
        # that sequence's failure, handled as any other per-sequence error)
        self.fault_hook: Optional[Callable[[Sequence], None]] = None

    def _use_cpu_kernels(self, cfg: EngineConfig) -> bool:
        """Whether few-row products go through :mod:`raymoe.model.cpu_kernels` (``EngineConfig.cpu_kernels``)."""
        if cfg.cpu_kernels == "off":
            return False
        from raymoe.model import cpu_kernels

        dtype = next(self.model.parameters()).dtype
        why = None
        if self.device.type != "cpu" or dtype != torch.float32:
            why = f"they run fp32 CPU models only (this engine: {dtype} on {self.device})"
        elif not cpu_kernels.available():
            why = cpu_kernels.why_unavailable()
        if why is not None and cfg.cpu_kernels == "on":
            raise ValueError(f"engine.cpu_kernels=on, but the CPU kernels cannot be used: {why} (use auto or off)")
        return why is None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | pathlib.Path, config: Optional[EngineConfig] = None,
                        tokenizer_path: Optional[str | pathlib.Path] = None,
                        expert_backend: Optional[ExpertBackend] = None) -> "LLMEngine":
        from raymoe.model import hf

        cfg = config or EngineConfig()
        path = pathlib.Path(path)
        # a backend whose shards read the routed experts from the checkpoint themselves: the engine holds none
        routed = getattr(expert_backend, "needs_expert_weights", True)
        model = hf.load(path, dtype=getattr(torch, cfg.dtype), routed_experts=routed).to(cfg.device)
        tok_src = pathlib.Path(tokenizer_path) if tokenizer_path else path
        tokenizer = load_tokenizer(tok_src) if (tok_src.is_file() or (tok_src / "tokenizer.json").exists()) else None
        return cls(model, tokenizer, cfg, eos_token_id=_eos_id(path, tokenizer), expert_backend=expert_backend)

    # ------------------------------------------------------------------ requests
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise EngineError("this engine has no tokenizer: send token ids", param="prompt")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in JSON) is valid JSON but not text
            raise EngineError(f"prompt is not valid Unicode text: {e.reason} at position {e.start}",
                              param="prompt") from None
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Seq[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _prompt_ids(self, prompt: str | Seq[int]) -> list[int]:
        """The prompt's token ids (encoded when text), refused when empty or outside the vocabulary."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        V = self.model_config.vocab_size
        if not ids:
            raise EngineError("prompt is empty", param="prompt")
        if any(t < 0 or t >= V for t in ids):
            raise EngineError(f"prompt token ids must be in [0, {V})", param="prompt")
        return ids

    def add_request(self, request_id: Optional[str], prompt: str | Seq[int], params: SamplingParams) -> str:
        try:
            params.validate()
        except ValueError as e:
            raise EngineError(str(e), param=getattr(e, "param", None)) from None
        if params.stop and self.tokenizer is None:
            raise EngineError("stop strings need a tokenizer", param="stop")
        ids = self._prompt_ids(prompt)
        V = self.model_config.vocab_size
        if params.logit_bias and any(t >= V for t in params.logit_bias):
            raise EngineError(f"logit_bias token ids must be in [0, {V})", param="logit_bias")
        if any(t < 0 or t >= V for t in params.stop_token_ids):
            raise EngineError(f"stop_token_ids must be in [0, {V})", param="stop_token_ids")
        limit = min(self.max_model_len, self.cache.num_blocks * self.cache.block_size)
        if len(ids) >= limit:
            raise EngineError(f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                              f"tokens (at least one must remain for the output)", param="prompt",
                              error_code="context_length_exceeded")
        if params.max_tokens is None:  # the rest of the context (chat's default); a copy: the caller's is unchanged
            params = dataclasses.replace(params, max_tokens=limit - len(ids))
            if params.min_tokens > params.max_tokens:
                raise EngineError(f"min_tokens ({params.min_tokens}) exceeds the {params.max_tokens} tokens left in "
                                  f"the context", param="min_tokens", error_code="context_length_exceeded")
        total = len(ids) + params.max_tokens
        if total > limit:
            raise EngineError(
                f"this model's maximum context length is {limit} tokens; the prompt ({len(ids)} tokens) + max_tokens "
                f"({params.max_tokens}) = {total}; lower max_tokens or the prompt", param="max_tokens",
                error_code="context_length_exceeded")
        n_waiting = len(self.scheduler.waiting)
        if n_waiting + params.n > self.config.max_waiting:
            raise EngineFull(f"{n_waiting} sequences waiting (bound {self.config.max_waiting})")
        request_id = request_id or f"req-{next(self._req_counter)}"
        if request_id in self.groups:
            raise EngineError(f"duplicate request id {request_id!r}", param="request_id")
        group = SequenceGroup(request_id, ids, params, stop_ids=frozenset(params.stop_token_ids))
        base_seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(62)
        for i in range(params.n):
            gen = None
            if not params.greedy:
                gen = torch.Generator(device="cpu")
                gen.manual_seed((int(base_seed) * 1_000_003 + i) % (2**63 - 1))
            seq = Sequence(group, i, list(ids), len(ids), gen)
            if self.tokenizer is not None:
                seq.detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            group.seqs.append(seq)
            self.scheduler.add(seq)
        self.groups[request_id] = group
        self.stats["prompt_tokens"] += len(ids) * params.n
        return request_id

    @torch.no_grad()
    def prompt_logprobs(self, prompt: str | Seq[int], k: int = 0) -> tuple[list[int], list[Optional[dict[str, Any]]]]:
        """Score a prompt (OpenAI ``echo`` with ``logprobs``; lm-evaluation-harness loglikelihoods): one full forward,
        no KV cache, outside the batch. Returns ``(ids, entries)``: ``entries[t]`` is ``{"token_id", "logprob",
        "top"}`` of token ``t`` given tokens ``< t`` under the raw distribution (``log_softmax`` of the logits, fp32;
        ``top``: the ``k`` most likely ids), ``None`` for the first token (nothing precedes it)."""
        ids = self._prompt_ids(prompt)
        if len(ids) > self.max_model_len:
            raise EngineError(f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                              f"{len(ids)} tokens", param="prompt", error_code="context_length_exceeded")
        device = next(self.model.parameters()).device
        logits_TV = self.model(torch.tensor([ids], device=device)).logits[0]
        entries: list[Optional[dict[str, Any]]] = [None]
        for t in range(1, len(ids)):
            lp, top = top_logprobs(logits_TV[t - 1], ids[t], k)
            entries.append({"token_id": ids[t], "logprob": lp, "top": top})
        return ids, entries

    def abort(self, request_id: str) -> None:
        self.failed.pop(request_id, None)
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        for s in group.seqs:
            if not s.finished:
                s.finish_reason = "abort"
            self.scheduler.remove(s)

    def has_unfinished(self) -> bool:
        return bool(self.groups)

    # ------------------------------------------------------------------ forward helpers
    def _mtp_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.mtp[0].head_norm(h))

    def _view(self, segments: list[tuple[list[int], int, int]]) -> PackedBatch | DecodeBatch | PrefillBatch:
        """The cache view of one forward. With ``expanded_prefill`` a step with a segment longer than
        ``fast_decode_max_tokens`` (a prefill chunk) gets a :class:`PrefillBatch` (those segments expanded, the
        others absorbed). Otherwise (``fast_decode`` on): :class:`DecodeBatch` (row-per-token layout) when every
        segment has at most ``fast_decode_max_tokens`` tokens, or when it is the cheaper layout for a step with
        prefill chunks (:meth:`_row_view_cheaper`); else :class:`PackedBatch` (one packed row)."""
        short = self.fast_decode_max_tokens
        if self.config.expanded_prefill and any(n > short for _, _, n in segments):
            self.forward_paths["prefill"] += 1
            return self.cache.prefill_batch(segments, short)
        if self.config.fast_decode and (all(n <= self.fast_decode_max_tokens for _, _, n in segments)
                                        or self._row_view_cheaper(segments)):
            self.forward_paths["decode"] += 1
            return self.cache.decode_batch(segments)
        self.forward_paths["packed"] += 1
        return self.cache.batch(segments)

    def _row_view_cheaper(self, segments: list[tuple[list[int], int, int]]) -> bool:
        """Row-per-token vs packed for one step, per layer: the row layout gathers ``N · S_max`` latents of width
        ``W = C + R`` and scores ``N · S_max`` per head; the packed layout scores ``N · Σ_j end_j`` per head. Take
        rows when ``N·S_max·(W + H) < N·Σ end·H`` (several sequences: a step prefilling many prompts) and the
        gathered keys fit ``fast_prefill_max_mib``."""
        ends = [start + n for _, start, n in segments]
        if len(ends) < 2:
            return False
        N, S_max, total = sum(n for _, _, n in segments), max(ends), sum(ends)
        W, H = self.cache.values_per_token, self.model_config.num_attention_heads
        fits = N * S_max * W * self.cache.buf.element_size() <= self.config.fast_prefill_max_mib * 2**20
        return fits and S_max * (W + H) < total * H

    def _embed(self, ids: list[int], view: PackedBatch | DecodeBatch) -> torch.Tensor:
        """Token embeddings in the view's layout: ``[N, 1, D]`` for a decode batch, ``[1, N, D]`` packed / prefill."""
        x = torch.tensor(ids, dtype=torch.long, device=self.device)
        return self.model.embed_tokens(x[:, None] if isinstance(view, DecodeBatch) else x[None])

    @staticmethod
    def _rows(h: torch.Tensor, view: PackedBatch | DecodeBatch) -> torch.Tensor:
        """``[N, 1, D]`` or ``[1, N, D]`` → ``[N, D]`` (a view; the token order is the same in both layouts)."""
        return h[:, 0] if isinstance(view, DecodeBatch) else h[0]

    @torch.no_grad()
    def _forward(self, ids: list[int], segments, logit_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Main-model forward of the step's tokens → (hidden [N, D], logits [len(logit_rows), V] fp32)."""
        m = self.model
        view = self._view(segments)
        h = self._rows(m.run_layers(self._embed(ids, view), range(len(m.layers)), view, RoutingStats()), view)
        if not logit_rows:
            return h, h.new_zeros(0, m.config.vocab_size).float()
        if len(logit_rows) == h.shape[0]:  # every row (decode steps): no gather
            return h, m.lm_head(m.norm(h)).float()
        return h, m.lm_head(m.norm(h[logit_rows])).float()

    @torch.no_grad()
    def _mtp_forward(self, ids: list[int], h_prev: torch.Tensor, segments) -> torch.Tensor:
        """MTP (depth 1) forward: ``ids`` are the tokens t_{i+1}, ``h_prev [N, D]`` the hiddens h_i → ``[N, D]``."""
        m = self.model
        view = self._view(segments)
        cos, sin = m.rotary(view.positions(1 if isinstance(view, DecodeBatch) else len(ids), self.device))
        h_prev = h_prev[:, None] if isinstance(view, DecodeBatch) else h_prev[None]
        return self._rows(m.mtp[0](self._embed(ids, view), h_prev, cos, sin, RoutingStats(), view), view)

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched:
            return []
        self.stats["steps"] += 1
        ids, segments, logit_rows, rows = [], [], [], []
        for s in sched:
            seq = s.seq
            new = seq.tokens[seq.num_computed : seq.num_computed + s.num_tokens] + s.drafts
            start = len(ids)
            ids.extend(new)
            segments.append((seq.block_table, seq.num_computed, len(new)))
            reaches_end = seq.num_computed + s.num_tokens == len(seq.tokens)
            lr0 = len(logit_rows)
            if reaches_end:
                logit_rows.extend(range(start + s.num_tokens - 1, start + len(new)))
            rows.append((start, lr0, len(logit_rows)))
        hidden, logits = self._forward(ids, segments, logit_rows)
        slogits = self._processed(sched, rows, logits)  # what sampling sees; `logits` stay raw (logprobs)
        # greedy choices of every logit row at once (one argmax, one conversion to Python ints)
        any_greedy = any(s.seq.group.params.greedy for s in sched)
        argmax = slogits.argmax(dim=-1).tolist() if any_greedy and logits.shape[0] else []
        # rows with a NaN/inf logit (one reduction for the step): their sequences fail, nobody else's
        finite = torch.isfinite(logits).all(dim=-1).tolist() if logits.shape[0] else []
        now = time.monotonic()
        touched: dict[str, SequenceGroup] = {}
        for s, (start, l0, l1) in zip(sched, rows):
            seq = s.seq
            touched[seq.group.request_id] = seq.group
            if seq.finished:  # its request failed through a sibling choice earlier in this step
                continue
            try:
                if not all(finite[l0:l1]):
                    raise FloatingPointError("the model produced non-finite logits for this request")
                self._step_seq(s, seq, hidden, logits, slogits, argmax, start, l0, l1, now)
            except Exception as e:  # noqa: BLE001 - one request's failure ends that request, never the step
                self._fail(seq.group, e)
        if self.num_spec:
            live = [s.seq for s in sched if not s.seq.finished and not s.seq.group.params.processes_logits]
            self._draft(live)
            for seq in live:
                self.scheduler.commit(seq, seq.mtp_computed)
        return [self._output(g) for g in touched.values()]

    def _step_seq(self, s, seq: Sequence, hidden: torch.Tensor, logits: torch.Tensor, slogits: torch.Tensor,
                  argmax: list[int], start: int, l0: int, l1: int, now: float) -> None:
        """One sequence's share of a step: verify drafts or sample, advance its cache position, append tokens."""
        if self.fault_hook is not None:
            self.fault_hook(seq)
        params = seq.group.params
        lg = logits[l0:l1]
        if s.drafts:
            emitted = speculative_accept(s.drafts, seq.draft_probs, lg, params, seq.generator,
                                         target_argmax=argmax[l0:l1] if params.greedy else None)
            a = len(emitted) - 1
            self.stats["spec_drafted"] += len(s.drafts)
            self.stats["spec_accepted"] += a
            self.stats["spec_verifies"] += 1
            self.stats["spec_emitted"] += len(emitted)
            valid = 1 + a  # t_last and the accepted drafts now hold valid latents
        else:
            if l1 == l0:
                emitted = []
            elif params.greedy:
                emitted = [argmax[l1 - 1]]
            else:
                emitted = [sample_token(slogits[l1 - 1], params, seq.generator)]
            lg = lg[-1:]
            valid = s.num_tokens
        if self.num_spec and not params.processes_logits:  # never drafted: no MTP state to keep
            hid = hidden[start : start + valid]
            seq.pending_hidden = hid if seq.pending_hidden is None else torch.cat([seq.pending_hidden, hid])
        seq.num_computed += valid
        seq.drafts, seq.draft_probs = [], None
        for j, tok in enumerate(emitted):
            self._append(seq, tok, lg[j], now)
            if seq.finished:
                break
        # blocks whose latents are final become reusable (with MTP: once the MTP layer covered them too)
        self.scheduler.commit(seq, seq.mtp_computed if self.num_spec else seq.num_computed)
        if seq.finished:
            self.scheduler.remove(seq)

    def _fail(self, group: SequenceGroup, exc: BaseException) -> None:
        """End ``group``'s request with an error: its sequences leave the scheduler (their blocks are freed). A
        non-finite result (``ArithmeticError``: NaN/inf logits or probabilities) also takes the blocks the request read
        out of the prefix cache: if the NaN sat in a cached block (a corrupted cache), later requests with the same
        prefix recompute it instead of failing the same way; if it came from the prompt, they fail again anyway."""
        log.warning("request %s failed: %s: %s", group.request_id, type(exc).__name__, exc)
        self.failed.setdefault(group.request_id, f"{type(exc).__name__}: {exc}")
        for s in group.seqs:
            if not s.finished:
                s.finish_reason = "error"
            s.drafts, s.draft_probs = [], None
            if isinstance(exc, ArithmeticError):
                self.cache.allocator.unregister(s.block_table)
            self.scheduler.remove(s)

    def _output(self, group: SequenceGroup) -> RequestOutput:
        """The request's snapshot; a failure while building it fails the request (error output) instead."""
        err = self.failed.get(group.request_id)
        if err is None:
            try:
                return self._snapshot(group)
            except Exception as e:  # noqa: BLE001 - e.g. detokenization of this request's text
                self._fail(group, e)
                err = self.failed[group.request_id]
        self.groups.pop(group.request_id, None)
        self.failed.pop(group.request_id, None)
        outs = [CompletionOutput(s.index, list(s.output_ids), "", "error") for s in group.seqs]
        return RequestOutput(group.request_id, group.prompt_ids, outs, True,
                             {"arrival_time": group.arrival_time, "finish_time": time.monotonic()}, error=err)

    def _processed(self, sched, rows: list[tuple[int, int, int]], logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with the logits processors applied (one :func:`process_logits` call over every row a request
        with a processor samples from this step); ``logits`` itself when no scheduled request uses one."""
        pick = [(l1 - 1, s.seq) for s, (_, l0, l1) in zip(sched, rows)
                if l1 > l0 and not s.drafts and s.seq.group.params.processes_logits]
        if not pick:
            return logits
        idx = [r for r, _ in pick]
        out = logits.clone()
        out[idx] = process_logits(logits[idx], [q.group.params for _, q in pick], [q.group.prompt_ids for _, q in pick],
                                  [q.output_ids for _, q in pick], self.eos_token_id)
        return out

    def _append(self, seq: Sequence, tok: int, logits_V: torch.Tensor, now: float) -> None:
        params = seq.group.params
        seq.tokens.append(tok)
        self.stats["generation_tokens"] += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
            if seq.group.first_token_time is None:
                seq.group.first_token_time = now
        if params.logprobs is not None:
            lp, top = top_logprobs(logits_V, tok, int(params.logprobs))
            seq.logprobs.append({"token_id": tok, "logprob": lp, "top": top})
        n_out = len(seq.tokens) - seq.prompt_len
        if n_out < params.min_tokens:  # vLLM: no stop condition but the length before min_tokens
            if n_out >= params.max_tokens or len(seq.tokens) >= self.max_model_len:
                seq.finish_reason = "length"
            return
        if tok in seq.group.stop_ids or (not params.ignore_eos and self.eos_token_id is not None
                                             and tok == self.eos_token_id):
            seq.finish_reason, seq.exclude_last_from_text = "stop", True
            return
        if seq.detok is not None:
            seq.detok.add([tok])
        if params.stop:
            text = self._text_of(seq)
            lo = max(0, len(text) - max(map(len, params.stop)) - 64)  # only new text can complete a stop string
            hits = [i for i in (text.find(st, lo) for st in params.stop) if i >= 0]
            if hits:
                seq.finish_reason, seq.stop_text_end = "stop", min(hits)
                return
        if n_out >= params.max_tokens or len(seq.tokens) >= self.max_model_len:
            seq.finish_reason = "length"

    def _text_of(self, seq: Sequence) -> str:
        """The output's text (a stop token excluded; cut at a stop string), kept incrementally by ``seq.detok``."""
        text = seq.detok.text if seq.detok is not None else ""
        return text if seq.stop_text_end is None else text[: seq.stop_text_end]

    def stable_text(self, seq: Sequence) -> str:
        """Text that later tokens cannot change: all of it once finished; otherwise without trailing incomplete
        UTF-8 (U+FFFD) and without the last ``max(len(stop)) - 1`` characters (a stop string may still start there)."""
        text = self._text_of(seq)
        if seq.finished:
            return text
        text = text.rstrip("\ufffd")
        hold = max(map(len, seq.group.params.stop), default=1) - 1
        return text[: max(0, len(text) - hold)]

    def _snapshot(self, group: SequenceGroup) -> RequestOutput:
        outs = []
        for s in group.seqs:
            outs.append(CompletionOutput(
                index=s.index, token_ids=list(s.output_ids), text=self.stable_text(s), finish_reason=s.finish_reason,
                logprobs=list(s.logprobs) if group.params.logprobs is not None else None))
        finished = group.finished
        metrics = {"arrival_time": group.arrival_time}
        if group.first_token_time is not None:
            metrics["first_token_time"] = group.first_token_time
        if finished:
            self.groups.pop(group.request_id, None)
            metrics["finish_time"] = time.monotonic()
        return RequestOutput(group.request_id, group.prompt_ids, outs, finished, metrics,
                             num_cached_tokens=group.seqs[0].num_cached_tokens or 0)

    # ------------------------------------------------------------------ MTP drafting
    @torch.no_grad()
    def _draft(self, seqs: list[Sequence]) -> None:
        """Run the MTP block over each sequence's positions whose next token is known, then propose drafts."""
        work = []  # (seq, start, end)
        for seq in seqs:
            end = min(seq.num_computed, len(seq.tokens) - 1)
            if end > seq.mtp_computed:
                work.append((seq, seq.mtp_computed, end))
        if not work:
            return
        ids, h_prev, segments, last_rows = [], [], [], []
        for seq, a, b in work:
            ids.extend(seq.tokens[a + 1 : b + 1])
            h_prev.append(seq.pending_hidden[: b - a])
            segments.append((seq.block_table, a, b - a))
            last_rows.append(len(ids) - 1)
        h1 = self._mtp_forward(ids, torch.cat(h_prev), segments)
        drafting = []
        for (seq, a, b), r in zip(work, last_rows):
            seq.pending_hidden = seq.pending_hidden[b - a :]
            seq.mtp_computed = b
            # decoding (the last token is a generated one, so a fresh request's first token is never drafted,
            # whatever the prefill chunking): propose what follows the last token. Requests with logits processors
            # never come here (step() leaves them out: module docstring of raymoe.engine.sampling)
            if b == seq.num_computed == len(seq.tokens) - 1 and len(seq.tokens) > seq.prompt_len:
                drafting.append((seq, h1[r]))
        for j in range(self.num_spec):
            if not drafting:
                return
            logits = self._mtp_logits(torch.stack([h for _, h in drafting])).float()
            greedy = any(seq.group.params.greedy for seq, _ in drafting)
            argmax = logits.argmax(dim=-1).tolist() if greedy else []
            nxt = []
            for i, ((seq, h), lg) in enumerate(zip(drafting, logits)):
                params = seq.group.params
                if seq.finished:  # failed through a sibling choice in this draft round
                    continue
                if params.greedy:
                    d, q = argmax[i], None
                else:
                    try:
                        q = probs_from_logits(lg, params)
                    except Exception as e:  # noqa: BLE001 - this request's failure only
                        self._fail(seq.group, e)
                        continue
                    d = int(torch.multinomial(q, 1, generator=seq.generator))
                seq.drafts.append(d)
                if q is not None:
                    seq.draft_probs = q[None] if seq.draft_probs is None else torch.cat([seq.draft_probs, q[None]])
                # the next draft step: MTP at position len(tokens) - 1 + j with (its own hidden, this draft)
                pos = len(seq.tokens) - 1 + j
                if j + 1 < self.num_spec and self.cache.ensure(seq.block_table, pos + 1):
                    nxt.append((seq, h, d, pos))
            if not nxt:
                return
            h_out = self._mtp_forward([d for _, _, d, _ in nxt], torch.stack([h for _, h, _, _ in nxt]),
                                      [(seq.block_table, pos, 1) for seq, _, _, pos in nxt])
            drafting = [(seq, h_out[i]) for i, (seq, _, _, _) in enumerate(nxt)]

    # ------------------------------------------------------------------ convenience
    def generate(self, prompts: Seq[str | Seq[int]], params: SamplingParams | Seq[SamplingParams]
                 ) -> list[RequestOutput]:
        """Add all prompts, step until they finish, return their final outputs in prompt order."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids = [self.add_request(None, p, sp) for p, sp in zip(prompts, plist)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def metrics(self) -> dict[str, float]:
        st = self.stats
        out = dict(st)
        sc, alloc = self.scheduler, self.cache.allocator
        out.update(
            prefix_cache_queries=sc.prefix_queries, prefix_cache_hits=sc.prefix_hits,
            prefix_cache_hit_rate=sc.prefix_hits / sc.prefix_queries if sc.prefix_queries else 0.0,
            prefix_cached_blocks=alloc.num_cached, prefix_cache_evictions=alloc.num_evictions,
        )
        out.update(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.cache.allocator.num_used, kv_blocks_total=self.cache.num_blocks,
            preemptions=self.scheduler.num_preemptions,
            spec_acceptance_rate=(st["spec_accepted"] / st["spec_drafted"]) if st["spec_drafted"] else 0.0,
            spec_tokens_per_forward=(st["spec_emitted"] / st["spec_verifies"]) if st["spec_verifies"] else 0.0,
        )
        return out
