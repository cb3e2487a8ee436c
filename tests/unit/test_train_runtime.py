"""The training runtime's pieces in one process: topology, layout errors, parallelize steps, sharded checkpoints."""
from __future__ import annotations

import pathlib

import pytest
import torch

from raymoe.config import ConfigError, ModelConfig, check_layout
from raymoe.model import DeepSeekV3
from raymoe.optim import GuardedAdamW
from raymoe.train import parallelize as par
from raymoe.train import sharded
from raymoe.train.topology import Topology

TINY = ModelConfig.preset("tiny")


def test_rank_numbering_and_groups() -> None:
    t = Topology(2, 2, 2, "dualpipe", 4, TINY)
    assert t.world_size == 8 and t.data_parallel_size == 4
    seen = set()
    for r in range(8):
        c = t.coords(r)
        assert t.rank_of(c.pp_rank, c.ep_rank, c.dp_rank) == r
        assert c.data_rank == c.ep_rank * 2 + c.dp_rank
        seen.add((c.pp_rank, c.ep_rank, c.dp_rank))
    assert len(seen) == 8
    assert t.ep_group(0) == (0, 2) and t.expert_dp_group(0) == (0, 1) and t.dense_dp_group(5) == (4, 5, 6, 7)
    assert t.model_group(1) == (1, 3, 5, 7)
    assert t.chunks(0) == [(0, 0), (1, 1)] and sorted(t.chunks(4)) == [(0, 1), (1, 0)]
    # DualPipe: both pipeline ranks hold every parameter; all of them are shared across the pair
    assert list(t.shared_param_sets) == [(0, 1)]
    assert set(t.shared_param_sets[(0, 1)]) == {n for n, _ in DeepSeekV3(TINY, device="meta").named_parameters()}
    kinds = [g.kind for g in t.group_specs()]
    assert kinds.count("p2p") == 8 and kinds.count("ep") == 4  # 4 data slices × one pair × two directions and kinds.count("expert_dp") == 4


def test_one_f_one_b_shares_only_the_mtp_embedding() -> None:
    t = Topology(2, 1, 1, "1f1b", 2, TINY)
    assert t.shared_param_sets == {(0, 1): ("embed_tokens.weight",)}
    assert t.grad_norm_owner("embed_tokens.weight", 0) and not t.grad_norm_owner("embed_tokens.weight", 1)


def test_microbatches_are_data_rank_slices_of_the_global_batch() -> None:
    t = Topology(2, 2, 1, "1f1b", 2, TINY)
    ids = list(range(8))  # 2 data ranks × 2 micro-batches × 2 sequences
    assert t.microbatches(0, ids, 2) == [[0, 1], [2, 3]]
    assert t.microbatches(1, ids, 2) == [[4, 5], [6, 7]]  # ep rank 1, pipeline rank 0
    assert t.microbatches(2, ids, 2) == [[0, 1], [2, 3]]  # pipeline rank 1 sees the same slice as rank 0
    with pytest.raises(ValueError, match="expected 8"):
        t.microbatches(0, ids[:6], 2)


@pytest.mark.parametrize("args, needle", [
    (dict(pp=1, ep=3, dp=1, schedule="1f1b", num_microbatches=1), r"parallel.ep=3 must divide model.n_routed_experts=8"),
    (dict(pp=3, ep=1, dp=1, schedule="dualpipe", num_microbatches=6), r"dualpipe needs an even parallel.pp"),
    (dict(pp=2, ep=1, dp=1, schedule="dualpipe", num_microbatches=2), r"num_microbatches >= 2\*pp = 4"),
    (dict(pp=2, ep=1, dp=1, schedule="1f1b", num_microbatches=1), r"parallel.pp=2 with parallel.schedule=1f1b needs train.num_microbatches >= 2"),
    (dict(pp=4, ep=1, dp=1, schedule="dualpipev", num_microbatches=8), r"8 stages but it has only 3 layers"),
    (dict(pp=0, ep=1, dp=1, schedule="1f1b", num_microbatches=1), r"parallel.pp must be an integer >= 1"),
])
def test_bad_layouts_fail_with_one_line_naming_the_key(args, needle) -> None:
    with pytest.raises(ConfigError, match=needle) as e:
        check_layout(model=TINY, **args)
    assert "\n" not in str(e.value)


def test_more_ranks_than_cpus_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"need 8 CPUs but the cluster has 4"):
        check_layout(2, 2, 2, "1f1b", 2, TINY, available_cpus=4, cpus_per_rank=1.0)


def test_apply_pp_keeps_only_this_ranks_share_under_full_names() -> None:
    t = Topology(2, 1, 1, "1f1b", 2, TINY)
    full = {n: p.numel() for n, p in par.build_model(TINY, 0).named_parameters()}
    total = 0
    for r in range(2):
        m = par.build_model(TINY, 0)
        chunks = par.apply_pp(m, t, r)
        names = {n for n, _ in m.named_parameters()}
        assert names == set(t.param_names(r)) and names <= set(full)
        assert list(chunks) == t.chunks(r)
        total += sum(full[n] for n in names)
    assert total == sum(full.values()) + full["embed_tokens.weight"]  # the last stage's MTP copy


def _trained(model: torch.nn.Module) -> GuardedAdamW:
    opt = GuardedAdamW(model.parameters(), lr=1e-2)
    out = model(torch.randint(0, TINY.vocab_size, (2, 16)), labels=torch.randint(0, TINY.vocab_size, (2, 16)))
    out.loss.backward()
    opt.step()
    return opt


def test_sharded_checkpoint_reshards_between_layouts(tmp_path: pathlib.Path) -> None:
    """Saved by pp=2 ranks, loaded by a pp=1 rank: weights and AdamW state are the full model's, exactly."""
    ref = par.build_model(TINY, 0)
    ref_opt = _trained(ref)
    t2 = Topology(2, 1, 1, "1f1b", 2, TINY)
    for r in range(2):
        m = par.build_model(TINY, 0)
        m.load_state_dict(ref.state_dict())
        par.apply_pp(m, t2, r)
        opt = GuardedAdamW(m.parameters(), lr=1e-2)
        by_name = dict(ref.named_parameters())
        for n, p in m.named_parameters():
            opt.state[p] = {k: v.clone() for k, v in ref_opt.state[by_name[n]].items()}
        sharded.save_rank(m, opt, t2, r, tmp_path)
    t1 = Topology(1, 1, 1, "1f1b", 1, TINY)
    fresh = par.build_model(TINY, 1)
    opt = GuardedAdamW(fresh.parameters(), lr=1e-2)
    sharded.load_rank(fresh, opt, t1, 0, tmp_path)
    by_name = dict(ref.named_parameters())
    for n, p in fresh.named_parameters():
        assert torch.equal(p, by_name[n]), n
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], ref_opt.state[by_name[n]][k]), (n, k)
    whole = sharded.assemble_full(tmp_path, DeepSeekV3(TINY))
    assert all(torch.equal(p, by_name[n]) for n, p in whole.named_parameters())


def test_sharded_checkpoint_of_another_model_is_refused(tmp_path: pathlib.Path) -> None:
    t = Topology(1, 1, 1, "1f1b", 1, TINY)
    m = par.build_model(TINY, 0)
    sharded.save_rank(m, GuardedAdamW(m.parameters()), t, 0, tmp_path)
    other = TINY.replace(hidden_size=64)
    big = par.build_model(other, 0)
    with pytest.raises(sharded.IncompatibleCheckpoint, match="has shape .* the model expects"):
        sharded.load_rank(big, GuardedAdamW(big.parameters()), Topology(1, 1, 1, "1f1b", 1, other), 0, tmp_path)
    with pytest.raises(sharded.IncompatibleCheckpoint, match="no shards"):
        sharded.ShardIndex(tmp_path / "nothing")


def test_deferred_weight_grads_survive_saved_tensor_hooks() -> None:
    """ZB1P's Bi/W split under the worker's activation meter (saved-tensor hooks) gives the reference gradients.
    Regression: the grouped experts' deferred W accumulated into the alias autograd hands back under hooks, so
    half the expert gradients were silently dropped."""
    import copy

    from raymoe.schedule import build
    from raymoe.schedule.executor import SequentialExecutor, reference_step, swap_linears
    from raymoe.train.worker import _ActivationMeter

    torch.manual_seed(0)
    m0 = DeepSeekV3(TINY)
    C = 4
    xs = [torch.randint(0, TINY.vocab_size, (1, 16)) for _ in range(C)]
    ys = [torch.randint(0, TINY.vocab_size, (1, 16)) for _ in range(C)]

    def kw(stage: int, mb: int) -> dict:
        return {"input_ids": xs[mb], "labels": ys[mb]} if stage == 1 else {}

    def loss(o, _t):
        return o.loss / C

    ref = copy.deepcopy(m0)
    reference_step(ref.stages(2), loss, xs, ys, kw)
    m = swap_linears(copy.deepcopy(m0))
    ex = SequentialExecutor(build("zb1p", 2, C), m.stages(2), loss, split="store", chunk_kwargs=kw)
    meter = _ActivationMeter(m)
    with meter.hooks():
        ex.step(xs, ys)
    assert meter.peak > 0
    g = dict(ref.named_parameters())
    for n, p in m.named_parameters():
        err = ((p.grad - g[n].grad).norm() / g[n].grad.norm()).item()
        assert err < 1e-5, (n, err)
