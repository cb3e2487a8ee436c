"""Deterministic, resumable sample order: global batches → DP ranks → micro-batches.

Order. Epoch ``e`` visits every sample id once in the order ``permutation(seed, e)`` (numpy ``PCG64`` seeded by
``SeedSequence([seed, e])``, or ``0..n-1`` with ``shuffle=False``). Global batches are consecutive slices of the
concatenation ``perm(0) ‖ perm(1) ‖ …``: a batch that reaches the end of an epoch continues into the next one, so
no sample is dropped and none is repeated within an epoch.

Position. The whole data position is two integers, ``(epoch, offset)`` — the next id is ``perm(epoch)[offset]``
— plus the settings that define the order (``num_samples``, ``seed``, ``shuffle``). ``state_dict()`` holds exactly
that (JSON-serializable); ``load_state_dict`` refuses a state taken over a different dataset size or seed, because
resuming would then silently replay or skip samples. A checkpoint taken after step ``k`` and resumed sees exactly
the ids an uninterrupted run sees from step ``k+1`` on.

Data parallelism. Every rank (or the coordinator alone) runs the same sampler, so all draw the same global batch
``ids[0:G]``; rank ``r`` of ``D`` takes the contiguous block ``ids[r·G/D : (r+1)·G/D]`` and cuts it into ``M``
micro-batches of ``G/(D·M)`` ids (:func:`split_batch`). Changing ``D`` between checkpoints keeps the global order
(elastic resume): only who-gets-which changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch

__all__ = ["ResumableSampler", "split_batch", "Batch", "BatchLoader"]

_STATE_VERSION = 1


class ResumableSampler:
    """Seeded per-epoch permutations, consumed in global batches, with an exact, checkpointable position.

    Example::

        >>> s = ResumableSampler(num_samples=10, seed=0)
        >>> s.next_batch(4)
        [4, 6, 2, 7]
        >>> state = s.state_dict()          # {'epoch': 0, 'offset': 4, 'seed': 0, ...}: JSON-serializable
        >>> t = ResumableSampler(10, seed=0)
        >>> t.load_state_dict(state)
        >>> t.next_batch(8) == s.next_batch(8)   # crosses into epoch 1 identically
        True
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.offset = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of sample ids in ``epoch`` (int64 ``[num_samples]``)."""
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch)])))
        return rng.permutation(self.num_samples).astype(np.int64)

    def _epoch_perm(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm, self._perm_epoch = self.permutation(self.epoch), self.epoch
        return self._perm

    @property
    def consumed(self) -> int:
        """Samples drawn so far, over all epochs."""
        return self.epoch * self.num_samples + self.offset

    def next_batch(self, batch_size: int) -> list[int]:
        """The next ``batch_size`` sample ids of the global order (may span an epoch boundary); advances."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out: list[int] = []
        while len(out) < batch_size:
            perm = self._epoch_perm()
            take = min(batch_size - len(out), self.num_samples - self.offset)
            out.extend(perm[self.offset : self.offset + take].tolist())
            self.offset += take
            if self.offset == self.num_samples:
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def next_rank_batch(self, global_batch: int, dp_rank: int, dp_size: int,
                        num_microbatches: int = 1) -> list[list[int]]:
        """Draw the next global batch and return this rank's micro-batches (every rank advances identically)."""
        return split_batch(self.next_batch(global_batch), dp_rank, dp_size, num_microbatches)

    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "num_samples": self.num_samples, "seed": self.seed,
                "shuffle": self.shuffle, "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_samples", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r} but this sampler has {key}="
                    f"{getattr(self, key)!r}: the dataset or seed changed since the checkpoint, so resuming would "
                    f"replay or skip samples; rebuild with the checkpoint's data settings"
                )
        if not 0 <= state["offset"] < self.num_samples or state["epoch"] < 0:
            raise ValueError(f"invalid sampler position epoch={state['epoch']} offset={state['offset']}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def __repr__(self) -> str:
        return (f"ResumableSampler(num_samples={self.num_samples}, seed={self.seed}, shuffle={self.shuffle}, "
                f"epoch={self.epoch}, offset={self.offset})")


def split_batch(ids: Sequence[int], dp_rank: int, dp_size: int, num_microbatches: int = 1) -> list[list[int]]:
    """Rank ``dp_rank``'s share of a global batch, cut into ``num_microbatches`` equal micro-batches.

    ``len(ids)`` must be divisible by ``dp_size · num_microbatches``.

        >>> split_batch(range(8), dp_rank=1, dp_size=2, num_microbatches=2)
        [[4, 5], [6, 7]]
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} outside [0, dp_size={dp_size})")
    if num_microbatches < 1 or len(ids) % (dp_size * num_microbatches):
        raise ValueError(f"global batch of {len(ids)} ids does not split into dp_size={dp_size} x "
                         f"num_microbatches={num_microbatches} equal micro-batches")
    per_rank = len(ids) // dp_size
    mine = list(ids[dp_rank * per_rank : (dp_rank + 1) * per_rank])
    mb = per_rank // num_microbatches
    return [mine[i * mb : (i + 1) * mb] for i in range(num_microbatches)]


class _Batchable(Protocol):
    def batch(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def __len__(self) -> int: ...


@dataclass
class Batch:
    """One micro-batch: ``input_ids [B, T]``, ``labels [B, T]`` (int64) and the sample ids they came from."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    sample_ids: list[int]


class BatchLoader:
    """Iterates optimizer steps for one DP rank: each item is that rank's list of ``num_microbatches`` batches.

    The position is the sampler's, so ``state_dict()`` taken between two steps resumes exactly. Infinite (epochs
    roll over); bound it with ``itertools.islice``.

    Example::

        loader = BatchLoader(train_ds, ResumableSampler(len(train_ds), seed=0), micro_batch_size=4,
                             num_microbatches=2, dp_rank=0, dp_size=2)
        for step in itertools.islice(loader, 100):
            for mb in step:                      # 2 micro-batches
                loss = model(mb.input_ids, labels=mb.labels)   # [4, T] each
    """

    def __init__(self, dataset: _Batchable, sampler: ResumableSampler, micro_batch_size: int,
                 num_microbatches: int = 1, dp_rank: int = 0, dp_size: int = 1) -> None:
        if sampler.num_samples != len(dataset):
            raise ValueError(f"sampler covers {sampler.num_samples} samples but the dataset has {len(dataset)}")
        if micro_batch_size < 1 or num_microbatches < 1:
            raise ValueError("micro_batch_size and num_microbatches must be >= 1")
        self.dataset, self.sampler = dataset, sampler
        self.micro_batch_size, self.num_microbatches = micro_batch_size, num_microbatches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        split_batch([0] * self.global_batch_size, dp_rank, dp_size, num_microbatches)  # validate the topology

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_microbatches * self.dp_size

    def __iter__(self) -> Iterator[list[Batch]]:
        return self

    def __next__(self) -> list[Batch]:
        mbs = self.sampler.next_rank_batch(self.global_batch_size, self.dp_rank, self.dp_size,
                                           self.num_microbatches)
        return [Batch(*self.dataset.batch(ids), sample_ids=ids) for ids in mbs]

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
