"""Several sources mixed with weights, as one dataset of samples the :class:`ResumableSampler` permutes.

Layout. Source ``i`` holds ``n_i`` samples (a :class:`PackedDataset`). The mixture has ``N = Σ n_i`` samples per epoch
and gives source ``i`` a contiguous block of ``c_i`` ids, ``c_i`` = ``w_i · N`` rounded by largest remainder (each
``c_i ≥ 1``; no weights = ``c_i = n_i``, plain concatenation). Mixture id ``j`` in source ``i``'s block, at offset
``k``, reads sample

* ``⌊k · n_i / c_i⌋`` when ``c_i ≤ n_i`` (a down-weighted source contributes an evenly spaced subset), or
* ``k mod n_i`` when ``c_i > n_i`` (an up-weighted source repeats: every sample ``⌊c_i/n_i⌋`` or one more times).

The map is a pure function of ``(n_i, w_i)``, so the sampler's ``(epoch, offset)`` position still pins the exact
sample order: resumed, shrunk or grown runs see the same samples. The sampler's per-epoch permutation spreads the
blocks over the epoch, so each global batch holds sources in proportion to their weights on average.

Example::

    >>> mix = MixedDataset([a, b], weights=[0.75, 0.25])   # len(a) = 100, len(b) = 300
    >>> mix.counts, len(mix)
    ([300, 100], 400)
    >>> mix.locate(0), mix.locate(299), mix.locate(300), mix.locate(301)
    ((0, 0), (0, 99), (1, 0), (1, 3))
"""
from __future__ import annotations

import bisect
from typing import Optional, Sequence

import numpy as np
import torch

from raymoe.data.shards import PackedDataset, stack_samples

__all__ = ["MixedDataset", "mixture_counts"]


def mixture_counts(sizes: Sequence[int], weights: Optional[Sequence[float]]) -> list[int]:
    """Samples per source in one epoch of the mixture (see the module docstring)."""
    if not sizes or any(n < 1 for n in sizes):
        raise ValueError(f"every mixed source needs at least one sample, got sizes {list(sizes)}")
    if not weights:
        return [int(n) for n in sizes]
    if len(weights) != len(sizes):
        raise ValueError(f"data.weights has {len(weights)} entries for {len(sizes)} sources; give one per source")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"data.weights must be positive numbers, got {list(weights)}")
    total = int(sum(sizes))
    exact = w / w.sum() * total
    counts = np.maximum(np.floor(exact).astype(np.int64), 1)
    rest = total - int(counts.sum())
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    for i in order[: max(rest, 0)]:
        counts[i] += 1
    return counts.tolist()


class MixedDataset:
    """Weighted mixture of :class:`PackedDataset` parts with the same ``seq_len`` (one part: a transparent wrapper).

    ``len(mix) = Σ counts``; ``mix.batch(ids)`` → ``(input_ids [B, T], labels [B, T])`` int64, like a part's.
    """

    def __init__(self, parts: Sequence[PackedDataset], weights: Optional[Sequence[float]] = None,
                 names: Optional[Sequence[str]] = None) -> None:
        if not parts:
            raise ValueError("MixedDataset needs at least one part")
        lens = {p.seq_len for p in parts}
        if len(lens) != 1:
            raise ValueError(f"mixed parts have different seq_len {sorted(lens)}")
        self.parts = list(parts)
        self.names = list(names) if names is not None else [str(p.dir) for p in parts]
        self.seq_len = parts[0].seq_len
        self.sizes = [len(p) for p in parts]
        self.counts = mixture_counts(self.sizes, weights)
        self._starts = np.cumsum([0] + self.counts[:-1]).tolist()
        self.num_tokens = sum(p.num_tokens for p in parts)

    def __len__(self) -> int:
        return int(sum(self.counts))

    def locate(self, j: int) -> tuple[int, int]:
        """Mixture id ``j`` → ``(part index, sample id in that part)``."""
        n = len(self)
        if not 0 <= j < n:
            raise IndexError(f"sample {j} out of range for a mixture of {n} samples")
        i = bisect.bisect_right(self._starts, j) - 1
        k, c, size = j - self._starts[i], self.counts[i], self.sizes[i]
        return i, (k * size) // c if c <= size else k % size

    def window(self, j: int) -> np.ndarray:
        i, s = self.locate(int(j))
        return self.parts[i].window(s)

    def window_mask(self, j: int) -> Optional[np.ndarray]:
        i, s = self.locate(int(j))
        fn = getattr(self.parts[i], "window_mask", None)
        return fn(s) if fn is not None else None

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch([int(j)])
        return x[0], y[0]

    def batch(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [B, T], labels [B, T])`` int64; labels ``-100`` where a part's loss mask is 0."""
        return stack_samples(self, ids)

    def __repr__(self) -> str:
        return f"MixedDataset(parts={self.names}, sizes={self.sizes}, counts={self.counts}, seq_len={self.seq_len})"
