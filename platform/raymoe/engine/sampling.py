"""Per-request sampling: parameters, the logits → distribution transform, seeded draws, speculative acceptance.

Distribution of one request at one position, from raw logits ``[V]`` (fp32), in vLLM's order:

1. **Logits processors** (:func:`process_logits`, vectorised over the step's rows; only for requests that use one):
   ``logit_bias`` added to its token ids; while fewer than ``min_tokens`` tokens were generated, the EOS id (unless
   ``ignore_eos``) and ``stop_token_ids`` set to ``-inf``; then the penalties: ``repetition_penalty`` r (CTRL,
   Keskar et al. 2019, as vLLM applies it) on every token id seen in the prompt *or* the output —
   ``x > 0 ? x / r : x · r`` — then, with ``c_v`` the count of token v in the *output* only,
   ``x_v −= frequency_penalty · c_v + presence_penalty · [c_v > 0]`` (OpenAI's definition); then ``min_p``: tokens
   whose probability after temperature is below ``min_p · p_max`` are dropped, i.e. in logit space
   ``x_v < x_max + T · ln(min_p)`` (applied before the temperature division, which it commutes with).
2. ``temperature == 0`` → greedy (argmax of the processed logits, ties to the lowest id); otherwise
   ``logits / temperature``, then top-k (keep the k largest), then top-p (keep the smallest prefix of the sorted
   distribution whose mass reaches p, at least one token), then softmax.

``logprobs`` always report the *raw* model distribution ``log_softmax(logits)`` (vLLM's default). Requests that use
a logits processor are not speculated (their rows are never drafted): each of their tokens comes from one plain
forward.

Draws use a per-sequence ``torch.Generator`` (seeded from the request seed and the choice index), so a seeded request
gives the same tokens whatever else is in the batch.

Speculative acceptance (Leviathan et al. 2023 / Chen et al. 2023). Drafts ``d_1..d_k`` were drawn from draft
distributions ``q_i`` (the MTP head's logits through the same transform); one target forward gives ``p_1..p_{k+1}``.
For i = 1..k: accept ``d_i`` with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection emit a token
from the residual ``norm(max(0, p_i − q_i))`` and stop; if all are accepted emit a bonus token from ``p_{k+1}``.
Every emitted token is then distributed exactly as under plain sampling from ``p``. Greedy requests accept
``d_i`` iff it is the target argmax and emit the target argmax at the first mismatch (output identical to plain
greedy decoding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence


import torch

__all__ = ["SamplingParams", "SamplingError", "probs_from_logits", "process_logits", "sample_token",
           "speculative_accept", "top_logprobs", "MAX_LOGPROBS", "MAX_STOP", "MAX_STOP_TOKEN_IDS"]

MAX_LOGPROBS = 20
MAX_STOP = 16  # stop strings per request inside the engine (the API allows 8 of the user's, plus its end marker)
MAX_STOP_TOKEN_IDS = 64  # checked per generated token against a set; a bound keeps requests small
MAX_LOGIT_BIAS = 1024  # entries of logit_bias


class SamplingError(ArithmeticError):
    """One sequence's distribution cannot be sampled (non-finite or zero mass): the engine ends that request only."""


@dataclass
class SamplingParams:
    max_tokens: Optional[int] = 16  # None: the rest of the context (the engine fills it in at admission)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: Optional[int] = None
    n: int = 1
    stop: Sequence[str] = field(default_factory=list)
    stop_token_ids: Sequence[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # top alternatives per generated token (0: only the chosen token's logprob)
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0  # [-2, 2], output tokens
    frequency_penalty: float = 0.0  # [-2, 2], output tokens
    repetition_penalty: float = 1.0  # > 0, prompt and output tokens; 1 = off
    min_p: float = 0.0  # [0, 1]
    logit_bias: Optional[dict[int, float]] = None  # token id -> added to its logit, [-100, 100]
    min_tokens: int = 0  # EOS / stop_token_ids suppressed and stops unchecked until this many tokens were generated

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}

    @property
    def processes_logits(self) -> bool:
        """True when a logits processor (bias, min_tokens, penalties, min_p) changes this request's distribution."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.min_p or self.logit_bias or self.min_tokens)

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def validate(self) -> None:
        """Raise ``ValueError(param, message)``-style errors (the API maps them to 400)."""
        def bad(param: str, msg: str) -> None:
            err = ValueError(msg)
            err.param = param  # type: ignore[attr-defined]
            raise err

        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (0.0 <= float(self.temperature) <= 100.0):
            bad("temperature", f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            bad("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}")
        if not isinstance(self.n, int) or not (1 <= self.n <= 64):
            bad("n", f"n must be an integer in [1, 64], got {self.n!r}")
        if len(self.stop) > MAX_STOP or any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", f"stop must be at most {MAX_STOP} non-empty strings")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad("stop_token_ids", f"stop_token_ids holds at most {MAX_STOP_TOKEN_IDS} ids, got "
                f"{len(self.stop_token_ids)}")
        if self.logprobs is not None and not (0 <= int(self.logprobs) <= MAX_LOGPROBS):
            bad("logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (-2.0 <= float(v) <= 2.0):
                bad(name, f"{name} must be in [-2, 2], got {v!r}")
        if not (0.0 < float(self.repetition_penalty) <= 100.0):
            bad("repetition_penalty", f"repetition_penalty must be in (0, 100], got {self.repetition_penalty!r}")
        if not (0.0 <= float(self.min_p) <= 1.0):
            bad("min_p", f"min_p must be in [0, 1], got {self.min_p!r}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            bad("min_tokens", f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logit_bias:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                bad("logit_bias", f"logit_bias holds at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
            for t, b in self.logit_bias.items():
                if t < 0:
                    bad("logit_bias", f"logit_bias token ids must be >= 0, got {t}")
                if not (-100.0 <= b <= 100.0):
                    bad("logit_bias", f"logit_bias values must be in [-100, 100], got {b!r} for token {t}")

    @property
    def greedy(self) -> bool:
        return float(self.temperature) == 0.0


def probs_from_logits(logits_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature → top-k → top-p → softmax. ``logits_V [V]`` (any float) → probabilities ``[V]`` fp32.

    The logits are shifted by their maximum before the division (softmax is shift-invariant): a tiny temperature
    (``1e-40`` is valid input) then sends every other logit to ``-inf`` and the best to 0 — the greedy limit —
    instead of overflowing to ``inf - inf = NaN``, which made ``multinomial`` raise inside the shared step."""
    x = logits_V.float()
    x = (x - x.max()) / float(params.temperature)
    V = x.shape[-1]
    if 0 < params.top_k < V:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, idx = torch.sort(x, descending=True)
        p = sorted_x.softmax(-1)
        mass_before = p.cumsum(-1) - p  # mass of strictly better tokens
        drop_sorted = mass_before >= params.top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(0, idx, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    probs = x.softmax(-1)
    # nothing non-finite ever reaches multinomial (it raises inside the shared step): NaN/inf logits, or a mask that
    # left no mass, end this sequence's request only (the engine catches SamplingError per sequence)
    if not bool(torch.isfinite(probs).all()):
        raise SamplingError("the model produced non-finite probabilities for this request")
    return probs


def process_logits(logits_MV: torch.Tensor, params: Sequence[SamplingParams], prompt_ids: Sequence[Sequence[int]],
                   output_ids: Sequence[Sequence[int]], eos_token_id: Optional[int] = None) -> torch.Tensor:
    """The logits processors of the module docstring (step 1) for ``M`` rows at once.

    Args:
        logits_MV: raw logits ``[M, V]`` (not modified).
        params: per row, its request's parameters.
        prompt_ids / output_ids: per row, the sequence's prompt and generated token ids so far.
        eos_token_id: the model's end-of-text id (suppressed under ``min_tokens`` unless ``ignore_eos``).

    Returns:
        processed logits ``[M, V]`` fp32 (a new tensor). Rows whose parameters use no processor are returned
        unchanged. Each processor is one tensor op over the rows that use it (scatter-built count / mask tensors),
        not a loop over the vocabulary.

    Example::

        >>> x = torch.tensor([[1.0, -1.0, 0.5]])
        >>> process_logits(x, [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5)], [[0]], [[1, 1]])
        tensor([[ 0.5000, -2.5000,  0.5000]])
    """
    x = logits_MV.float().clone()
    M, V = x.shape
    dev = x.device
    ninf = float("-inf")
    # logit_bias: one accumulate-scatter of (row, token, bias) triples
    r, t, b = [], [], []
    for i, p in enumerate(params):
        for tok, v in (p.logit_bias or {}).items():
            r.append(i), t.append(tok), b.append(v)
    if r:
        x.index_put_((torch.tensor(r, device=dev), torch.tensor(t, device=dev)),
                     torch.tensor(b, dtype=x.dtype, device=dev), accumulate=True)
    # min_tokens: EOS and stop ids at -inf while the output is shorter
    r, t = [], []
    for i, p in enumerate(params):
        if len(output_ids[i]) < p.min_tokens:
            ids = list(p.stop_token_ids)
            if eos_token_id is not None and not p.ignore_eos:
                ids.append(eos_token_id)
            r.extend([i] * len(ids)), t.extend(ids)
    if r:
        x[torch.tensor(r, device=dev), torch.tensor(t, device=dev)] = ninf
    # penalties over the rows that have any: output counts [P, V] (+ prompt presence for repetition)
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if rows:
        counts = _counts([output_ids[i] for i in rows], V, dev)
        xs = x[rows]
        rep = torch.tensor([params[i].repetition_penalty for i in rows], device=dev)[:, None]
        if bool((rep != 1.0).any()):
            seen = (_counts([prompt_ids[i] for i in rows], V, dev) > 0) | (counts > 0)
            xs = torch.where(seen, torch.where(xs > 0, xs / rep, xs * rep), xs)
        freq = torch.tensor([params[i].frequency_penalty for i in rows], device=dev)[:, None]
        pres = torch.tensor([params[i].presence_penalty for i in rows], device=dev)[:, None]
        x[rows] = xs - freq * counts - pres * (counts > 0).float()
    # min_p (sampled rows only: it never changes the argmax)
    rows = [i for i, p in enumerate(params) if p.min_p > 0 and not p.greedy]
    if rows:
        xs = x[rows]
        tl = torch.tensor([float(params[i].temperature) * math.log(params[i].min_p) for i in rows], device=dev)
        x[rows] = xs.masked_fill(xs < xs.max(-1, keepdim=True).values + tl[:, None], ninf)
    return x


def _counts(seqs: Sequence[Sequence[int]], V: int, device: torch.device) -> torch.Tensor:
    """Per row, how often each token id occurs: ``[len(seqs), V]`` fp32 (one padded scatter-add)."""
    L = max((len(s) for s in seqs), default=0)
    out = torch.zeros(len(seqs), V + 1, device=device)
    if L:
        idx = torch.full((len(seqs), L), V, dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                idx[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        out.scatter_add_(1, idx.to(device), torch.ones(idx.shape, device=device))
    return out[:, :V]


def sample_token(logits_V: torch.Tensor, params: SamplingParams, gen: Optional[torch.Generator]) -> int:
    if params.greedy:
        return int(torch.argmax(logits_V))
    return int(torch.multinomial(probs_from_logits(logits_V, params), 1, generator=gen))


def top_logprobs(logits_V: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """``(logprob of token, [(id, logprob)] of the k most likely)`` under the raw model distribution."""
    lp = torch.log_softmax(logits_V.float(), -1)
    top: list[tuple[int, float]] = []
    if k > 0:
        v, i = torch.topk(lp, min(k, lp.shape[-1]))
        top = [(int(a), float(b)) for a, b in zip(i, v)]
    return float(lp[token]), top


def speculative_accept(
    drafts: Sequence[int],
    draft_probs: Optional[torch.Tensor],
    target_logits: torch.Tensor,
    params: SamplingParams,
    gen: Optional[torch.Generator],
    target_argmax: Optional[Sequence[int]] = None,
) -> list[int]:
    """Verify ``k`` drafts against ``target_logits [k+1, V]`` (see module docstring); ``draft_probs [k, V]`` are the
    draft distributions (unused when greedy). Returns the emitted tokens: the accepted drafts plus one more.
    ``target_argmax`` (greedy only, optional): ``argmax(target_logits, -1)`` already computed by the caller (the
    engine takes one argmax over the whole step's logits)."""
    k = len(drafts)
    if params.greedy:
        target = list(target_argmax) if target_argmax is not None else torch.argmax(target_logits, dim=-1).tolist()
        out = []
        for i in range(k):
            if drafts[i] != target[i]:
                return out + [target[i]]
            out.append(drafts[i])
        return out + [target[k]]
    out = []
    for i in range(k):
        p = probs_from_logits(target_logits[i], params)
        q = draft_probs[i]
        d = drafts[i]
        ratio = float(p[d]) / max(float(q[d]), 1e-30)
        r = float(torch.rand((), generator=gen))
        if r < min(1.0, ratio):
            out.append(d)
            continue
        residual = (p - q).clamp_min(0)
        total = float(residual.sum())
        if total <= 0:  # p == q numerically: the residual is undefined, p itself is the right distribution
            residual = p
        return out + [int(torch.multinomial(residual, 1, generator=gen))]
    p = probs_from_logits(target_logits[k], params)
    return out + [int(torch.multinomial(p, 1, generator=gen))]
