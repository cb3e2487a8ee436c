"""ResumableSampler / split_batch / BatchLoader: determinism, epochs, exact resume, DP split (no corpus needed)."""
from __future__ import annotations

import doctest
import json

import pytest
import torch

from raymoe.data import BatchLoader, ResumableSampler, split_batch


def _draw(sampler: ResumableSampler, steps: int, batch: int) -> list[list[int]]:
    return [sampler.next_batch(batch) for _ in range(steps)]


def test_same_seed_same_order_other_seed_other_order():
    a = _draw(ResumableSampler(1000, seed=7), 5, 64)
    assert a == _draw(ResumableSampler(1000, seed=7), 5, 64)
    assert a != _draw(ResumableSampler(1000, seed=8), 5, 64)
    assert ResumableSampler(10, shuffle=False).next_batch(10) == list(range(10))


def test_epochs_are_permutations_and_batches_cross_epoch_boundaries():
    s = ResumableSampler(10, seed=0)
    ids = sum(_draw(s, 5, 4), [])  # 20 ids = exactly two epochs, batch 3 straddles the boundary
    assert sorted(ids[:10]) == list(range(10)) and sorted(ids[10:]) == list(range(10))
    assert ids[:10] != ids[10:]  # a fresh permutation per epoch
    assert (s.epoch, s.offset, s.consumed) == (2, 0, 20)
    assert ids[:10] == s.permutation(0).tolist() and ids[10:] == s.permutation(1).tolist()


@pytest.mark.parametrize("cut", [0, 1, 3, 7, 12])
def test_interrupted_run_plus_resume_sees_exactly_the_same_sample_ids(cut):
    """Checkpoint after ``cut`` steps (JSON round trip, new process-like object), resume, compare to one run."""
    steps, batch, n = 15, 6, 40  # 90 ids over 40 samples: resumes land mid-epoch and across epoch boundaries
    uninterrupted = _draw(ResumableSampler(n, seed=123), steps, batch)
    first = ResumableSampler(n, seed=123)
    seen = _draw(first, cut, batch)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = ResumableSampler(n, seed=123)
    resumed.load_state_dict(state)
    seen += _draw(resumed, steps - cut, batch)
    assert seen == uninterrupted


def test_resume_refuses_a_different_dataset_or_seed():
    state = ResumableSampler(100, seed=1).state_dict()
    with pytest.raises(ValueError, match="num_samples=100"):
        ResumableSampler(99, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=1"):
        ResumableSampler(100, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="invalid sampler position"):
        ResumableSampler(100, seed=1).load_state_dict({**state, "offset": 100})


def test_split_batch_partitions_the_global_batch_over_ranks_and_microbatches():
    ids = list(range(100, 124))
    parts = [split_batch(ids, r, 3, 2) for r in range(3)]
    assert all(len(p) == 2 and all(len(mb) == 4 for mb in p) for p in parts)
    assert [i for p in parts for mb in p for i in mb] == ids  # disjoint, complete, in order
    assert split_batch(range(8), 1, 2, 2) == [[4, 5], [6, 7]]
    with pytest.raises(ValueError, match="does not split"):
        split_batch(ids, 0, 5, 1)
    with pytest.raises(ValueError, match="dp_rank=3"):
        split_batch(ids, 3, 3, 1)


def test_every_rank_draws_the_same_global_order_whatever_the_dp_degree():
    g = ResumableSampler(50, seed=5).next_batch(8)
    per_rank = [ResumableSampler(50, seed=5).next_rank_batch(8, r, 4, 1) for r in range(4)]
    assert [i for p in per_rank for mb in p for i in mb] == g
    assert ResumableSampler(50, seed=5).next_rank_batch(8, 0, 1, 2) == [g[:4], g[4:]]


class _RangeDataset:
    """Sample i = tokens [i, i+1, …, i+T] (so ids are visible in the tensors)."""

    seq_len = 5

    def __len__(self) -> int:
        return 30

    def batch(self, ids):
        w = torch.tensor([[i + t for t in range(self.seq_len + 1)] for i in ids], dtype=torch.long)
        return w[:, :-1], w[:, 1:]


def test_batch_loader_shapes_and_per_rank_microbatches():
    ds = _RangeDataset()
    loaders = [BatchLoader(ds, ResumableSampler(30, seed=0), micro_batch_size=3, num_microbatches=2,
                           dp_rank=r, dp_size=2) for r in range(2)]
    g = ResumableSampler(30, seed=0).next_batch(12)
    steps = [next(ld) for ld in loaders]
    assert [i for s in steps for mb in s for i in mb.sample_ids] == g
    mb = steps[1][0]
    assert mb.input_ids.shape == mb.labels.shape == (3, 5) and mb.input_ids.dtype == torch.long
    assert mb.input_ids[:, 0].tolist() == mb.sample_ids and torch.equal(mb.labels[:, :-1], mb.input_ids[:, 1:])
    with pytest.raises(ValueError, match="dataset has 30"):
        BatchLoader(ds, ResumableSampler(31), micro_batch_size=1)
    with pytest.raises(ValueError, match="dp_rank=2"):
        BatchLoader(ds, ResumableSampler(30), micro_batch_size=1, dp_rank=2, dp_size=2)


def test_docstring_examples_hold():
    import raymoe.data.corpus
    import raymoe.data.sampler

    for mod in (raymoe.data.sampler, raymoe.data.corpus):
        res = doctest.testmod(mod)
        assert res.attempted > 0 and res.failed == 0, mod.__name__
