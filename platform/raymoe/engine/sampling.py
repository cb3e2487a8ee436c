"""Per-request sampling: parameters, the logits → distribution transform, seeded draws, speculative acceptance.

Distribution of one request at one position, from raw logits ``[V]`` (fp32):
``temperature == 0`` → greedy (argmax, ties to the lowest id); otherwise ``logits / temperature``, then top-k
(keep the k largest), then top-p (keep the smallest prefix of the sorted distribution whose mass reaches p, at least
one token), then softmax. ``logprobs`` always report the *raw* model distribution ``log_softmax(logits)``.

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

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

__all__ = ["SamplingParams", "SamplingError", "probs_from_logits", "sample_token", "speculative_accept",
           "top_logprobs"]

MAX_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 64  # checked per generated token against a set; a bound keeps requests small


class SamplingError(ArithmeticError):
    """One sequence's distribution cannot be sampled (non-finite or zero mass): the engine ends that request only."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.top_k == -1:
            self.top_k = 0

    def validate(self) -> None:
        """Raise ``ValueError(param, message)``-style errors (the API maps them to 400)."""
        def bad(param: str, msg: str) -> None:
            err = ValueError(msg)
            err.param = param  # type: ignore[attr-defined]
            raise err

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (0.0 <= float(self.temperature) <= 100.0):
            bad("temperature", f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            bad("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}")
        if not isinstance(self.n, int) or not (1 <= self.n <= 64):
            bad("n", f"n must be an integer in [1, 64], got {self.n!r}")
        if len(self.stop) > 8 or any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "stop must be at most 8 non-empty strings")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad("stop_token_ids", f"stop_token_ids holds at most {MAX_STOP_TOKEN_IDS} ids, got "
                f"{len(self.stop_token_ids)}")
        if self.logprobs is not None and not (0 <= int(self.logprobs) <= MAX_LOGPROBS):
            bad("logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

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
