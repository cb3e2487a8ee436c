"""raymoe.balance.eplb: redundant-expert placement (contract properties, hand-checked plans, errors) and its bench."""
from __future__ import annotations

import doctest
import itertools
import json

import pytest
import torch

from raymoe.balance import balancedness, eplb, rebalance_experts, trivial_placement
from raymoe.balance.eplb import balanced_packing, replicate_experts

# (layers, experts, replicas, groups, nodes, gpus)
SHAPES = [
    (3, 16, 20, 4, 2, 4),    # hierarchical, 2 nodes
    (2, 32, 48, 8, 4, 8),    # hierarchical, 4 nodes, 2 GPUs per node
    (2, 12, 12, 3, 1, 4),    # one node, no redundancy
    (2, 16, 24, 2, 4, 8),    # 2 % 4 != 0: global
    (2, 16, 32, 4, 2, 2),    # one GPU per node: nothing to refine inside a node
    (1, 8, 15, 1, 1, 5),     # odd slot count per GPU
]


def _loads(seed: int, layers: int, experts: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.empty(layers, experts, dtype=torch.float64).log_normal_(0.0, 1.2, generator=g)
    if seed % 3 == 0:
        w[0, : experts // 4] = 0.0  # some idle experts
    return w


def _gpu_loads(w, phy2log, logcnt, gpus):
    slot = w.double().gather(1, phy2log) / logcnt.gather(1, phy2log).double()
    return slot.view(w.shape[0], gpus, -1).sum(-1)


def _check_contract(w, phy2log, log2phy, logcnt, replicas, gpus):
    layers, experts = w.shape
    assert phy2log.shape == (layers, replicas) and phy2log.dtype == torch.int64
    assert log2phy.shape == (layers, experts, replicas - experts + 1) and log2phy.dtype == torch.int64
    assert logcnt.shape == (layers, experts) and logcnt.dtype == torch.int64
    assert int(phy2log.min()) >= 0 and int(phy2log.max()) < experts
    assert (logcnt >= 1).all()                                  # every logical expert has a replica
    assert (logcnt.sum(-1) == replicas).all()
    for layer in range(layers):
        assert torch.equal(torch.bincount(phy2log[layer], minlength=experts), logcnt[layer])
        seen = []
        for e in range(experts):
            c = int(logcnt[layer, e])
            slots = log2phy[layer, e, :c]
            assert torch.equal(slots, torch.sort(slots).values)         # ascending
            assert (phy2log[layer, slots] == e).all()                   # log2phy and phy2log agree
            assert (log2phy[layer, e, c:] == -1).all()                  # padding
            seen += slots.tolist()
        assert sorted(seen) == list(range(replicas))                    # every slot listed exactly once
    assert replicas % gpus == 0                                         # equal slots per GPU (GPU-major layout)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("seed", range(4))
def test_plans_satisfy_the_contract(shape, seed):
    layers, experts, replicas, groups, nodes, gpus = shape
    w = _loads(seed, layers, experts)
    greedy = rebalance_experts(w, replicas, groups, nodes, gpus, refine=False)
    refined = rebalance_experts(w, replicas, groups, nodes, gpus)
    for plan in (greedy, refined):
        _check_contract(w, *plan, replicas, gpus)
    assert torch.equal(greedy[2], refined[2])  # refinement moves replicas, never changes their counts
    # refined is never worse than greedy, layer by layer
    bg, br = balancedness(w, greedy[0], greedy[2], gpus), balancedness(w, refined[0], refined[2], gpus)
    assert (br <= bg + 1e-12).all()
    assert (br >= 1.0 - 1e-12).all()
    # deterministic
    again = rebalance_experts(w, replicas, groups, nodes, gpus)
    assert all(torch.equal(a, b) for a, b in zip(refined, again))
    if groups % nodes == 0:  # hierarchical: each group lives on exactly one node, groups_per_node groups a node
        slots_per_node = replicas // nodes
        group_of_slot = refined[0] // (experts // groups)               # [L, R]
        node_of_slot = torch.arange(replicas) // slots_per_node
        for layer in range(layers):
            per_node = [set(group_of_slot[layer, node_of_slot == n].tolist()) for n in range(nodes)]
            assert all(len(s) == groups // nodes for s in per_node)
            assert sorted(itertools.chain.from_iterable(per_node)) == list(range(groups))


def test_integer_counts_and_float_weights_give_the_same_plan():
    w = torch.randint(0, 1000, (3, 16))
    a = rebalance_experts(w, 20, 4, 2, 4)
    b = rebalance_experts(w.double(), 20, 4, 2, 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_global_fallback_equals_one_node_one_group():
    w = _loads(7, 2, 16)
    fallback = rebalance_experts(w, 24, 2, 4, 8)          # 2 groups cannot be spread over 4 nodes
    single = rebalance_experts(w, 24, 1, 1, 8)
    assert all(torch.equal(x, y) for x, y in zip(fallback, single))


@pytest.mark.parametrize("groups, nodes, gpus", [(7, 2, 32), (8, 3, 32), (5, 2, 16), (3, 4, 6)])
def test_global_policy_needs_no_group_or_node_divisibility(groups, nodes, gpus):
    """Groups that do not spread over the nodes mean the global policy, as in DeepSeek's EPLB, even when the
    experts do not split into ``groups`` (256 % 7) or the GPUs into ``nodes`` (6 % 4): those only bind the
    hierarchical policy. The plan equals the one-node one-group plan and satisfies the contract."""
    w = _loads(11, 3, 256)
    replicas = 288 if 288 % gpus == 0 else 258
    plan = rebalance_experts(w, replicas, groups, nodes, gpus)
    single = rebalance_experts(w, replicas, 1, 1, gpus)
    assert all(torch.equal(x, y) for x, y in zip(plan, single))
    phy2log, log2phy, logcnt = plan
    assert phy2log.shape == (3, replicas) and (logcnt.sum(-1) == replicas).all()
    assert balancedness(w, phy2log, logcnt, gpus).max() < balancedness(w, *trivial_placement(w, replicas, gpus)[::2],
                                                                         gpus).min()


def test_hierarchical_policy_still_checks_its_divisibility():
    with pytest.raises(ValueError, match=r"experts \(256\) must be divisible by num_groups \(6\)"):
        rebalance_experts(torch.ones(1, 256), 288, 6, 2, 32)     # 6 % 2 == 0: hierarchical, 256 % 6 != 0


# ------------------------------------------------------------------------------------------------ hand-checked
def test_hand_checked_global_case_refinement_reaches_the_optimum():
    w = torch.tensor([[8.0, 4.0, 2.0, 2.0]])
    phy2log, log2phy, logcnt = rebalance_experts(w, 6, 1, 1, 2, refine=False)
    # expert 0 takes both extra slots (8/3 per replica); greedy packs 4+8/3+2 | 8/3+8/3+2
    assert logcnt.tolist() == [[3, 1, 1, 1]]
    assert phy2log.tolist() == [[1, 0, 3, 0, 0, 2]]
    assert _gpu_loads(w, phy2log, logcnt, 2)[0].tolist() == pytest.approx([26 / 3, 22 / 3])
    assert balancedness(w, phy2log, logcnt, 2).item() == pytest.approx(13 / 12)
    phy2log, log2phy, logcnt = rebalance_experts(w, 6, 1, 1, 2)
    # one swap (a replica of expert 0 for expert 2) gives 8 | 8, the optimum: strictly better than greedy
    assert phy2log.tolist() == [[1, 2, 3, 0, 0, 0]]
    assert log2phy.tolist() == [[[3, 4, 5], [0, -1, -1], [1, -1, -1], [2, -1, -1]]]
    assert _gpu_loads(w, phy2log, logcnt, 2)[0].tolist() == pytest.approx([8.0, 8.0])
    assert balancedness(w, phy2log, logcnt, 2).item() == pytest.approx(1.0)


def test_hand_checked_hierarchical_case():
    # 4 groups of 2 experts: group loads 100, 60, 60, 20 -> nodes {g0, g3} and {g1, g2}, 120 each
    w = torch.tensor([[90.0, 10.0, 40.0, 20.0, 30.0, 30.0, 5.0, 15.0]])
    phy2log, log2phy, logcnt = rebalance_experts(w, 12, 4, 2, 4)
    assert set(phy2log[0, :6].tolist()) == {0, 1, 6, 7} and set(phy2log[0, 6:].tolist()) == {2, 3, 4, 5}
    # node 0: 90 gets both extra slots (30 each); node 1: 40 and the first 30 get one each
    assert logcnt.tolist() == [[3, 1, 2, 1, 2, 1, 1, 1]]
    gpu = _gpu_loads(w, phy2log, logcnt, 4)[0].tolist()
    # node 0 cannot beat 30+30+5 = 65 (three slots of 30 over two GPUs); node 1 reaches 60 | 60 only after a swap
    assert sorted(gpu[:2]) == pytest.approx([55, 65])
    assert sorted(gpu[2:]) == pytest.approx([60, 60])
    greedy = rebalance_experts(w, 12, 4, 2, 4, refine=False)
    assert sorted(_gpu_loads(w, greedy[0], greedy[2], 4)[0, 2:].tolist()) == pytest.approx([55, 65])


def test_trivial_placement_and_balancedness():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    phy2log, log2phy, logcnt = trivial_placement(w, 6, 2)
    assert phy2log.tolist() == [[0, 1, 2, 3, 0, 1]] * 3
    assert logcnt.tolist() == [[2, 2, 1, 1]] * 3
    assert log2phy[0].tolist() == [[0, 4, -1], [1, 5, -1], [2, -1, -1], [3, -1, -1]]
    b = balancedness(w, phy2log, logcnt, 2)
    assert b.dtype == torch.float64
    # uniform: 0.5+0.5+1 | 1+0.5+0.5; all on expert 0: 2 | 2; empty layer: 1 by convention
    assert b.tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert balancedness(w, phy2log, logcnt, 3).tolist() == pytest.approx([1.5, 1.5, 1.0])  # 1|2|1, 2|0|2: 2/(4/3)


def test_balanced_packing_and_replication_building_blocks():
    w = torch.tensor([[5.0, 4.0, 3.0, 3.0, 2.0, 1.0]])
    pack, rank = balanced_packing(w, 2)
    assert pack.tolist() == [[0, 1, 1, 0, 1, 0]] and rank.tolist() == [[0, 0, 1, 1, 2, 2]]  # 5+3+1 | 4+3+2
    phy2log, cnt = replicate_experts(torch.tensor([[9.0, 4.0, 1.0]]), 6)
    assert cnt.tolist() == [[3, 2, 1]] and phy2log.tolist() == [[0, 1, 2, 0, 0, 1]]  # 9→4.5→3, then 4→2
    # the greedy replica allocation minimises the largest per-replica load (brute force over allocations)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.rand(1, 4, generator=g, dtype=torch.float64)
        _, c = replicate_experts(x, 8)
        best = min(max(x[0, i].item() / k[i] for i in range(4))
                   for k in itertools.product(range(1, 6), repeat=4) if sum(k) == 8)
        assert (x / c).max().item() == pytest.approx(best)


def test_module_docstring_example():
    res = doctest.testmod(eplb, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "weight, args, exc, match",
    [
        ([[1.0, 2.0]], (2, 1, 1, 1), TypeError, "torch.Tensor"),
        (torch.ones(4), (4, 1, 1, 1), ValueError, "2-D"),
        (torch.ones(0, 4), (4, 1, 1, 1), ValueError, "non-empty"),
        (torch.ones(2, 4, dtype=torch.bool), (4, 1, 1, 1), TypeError, "real loads"),
        (torch.tensor([[1.0, float("nan")]]), (2, 1, 1, 1), ValueError, "finite"),
        (torch.tensor([[1.0, float("inf")]]), (2, 1, 1, 1), ValueError, "finite"),
        (torch.tensor([[1.0, -1.0]]), (2, 1, 1, 1), ValueError, "non-negative"),
        (torch.ones(1, 8), (6, 1, 1, 2), ValueError, r"num_replicas \(6\) must be >= the number of experts \(8\)"),
        (torch.ones(1, 8), (10, 1, 1, 4), ValueError, r"num_replicas \(10\) must be divisible by num_gpus \(4\)"),
        (torch.ones(1, 8), (12, 4, 2, 3), ValueError, r"num_gpus \(3\) must be divisible by num_nodes \(2\)"),
        (torch.ones(1, 8), (8, 3, 1, 2), ValueError, r"experts \(8\) must be divisible by num_groups \(3\)"),
        (torch.ones(1, 8), (8, 0, 1, 2), ValueError, "num_groups must be a positive int"),
        (torch.ones(1, 8), (8, 1, 1, 2.0), ValueError, "num_gpus must be a positive int"),
        (torch.ones(1, 8), (True, 1, 1, 1), ValueError, "num_replicas must be a positive int"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(weight, args, exc, match):
    with pytest.raises(exc, match=match):
        rebalance_experts(weight, *args)


def test_other_entry_points_validate():
    with pytest.raises(ValueError, match="max_iters"):
        rebalance_experts(torch.ones(1, 4), 4, 1, 1, 2, max_iters=0)
    with pytest.raises(ValueError, match="divisible by num_gpus"):
        trivial_placement(torch.ones(1, 4), 6, 4)
    p2l, _, cnt = trivial_placement(torch.ones(1, 4), 6, 2)
    with pytest.raises(ValueError, match="shapes do not match"):
        balancedness(torch.ones(1, 4), p2l, cnt[:, :3], 2)
    with pytest.raises(ValueError, match="split evenly over 4 GPUs"):
        balancedness(torch.ones(1, 4), p2l, cnt, 4)


# ------------------------------------------------------------------------------------------------ bench
def test_bench_runs_on_a_tiny_case_and_reads_recorded_loads(tmp_path):
    from safetensors.torch import save_file

    from raymoe.jobs.benches.eplb import read_loads, run

    res = run({"cases": "tiny", "reps": "1", "plot": str(tmp_path / "eplb.png")})
    (row,) = res["cases"]
    assert row["case"] == "tiny" and row["mode"] == "hierarchical"
    q = row["quality"]
    assert q["refined"]["mean"] <= q["greedy"]["mean"] + 1e-12 and q["refined"]["mean"] >= row["bound"]["mean"] - 1e-9
    assert row["replan_ms"]["refined"] > 0
    assert (tmp_path / "eplb.png").stat().st_size > 5_000
    json.dumps(res)  # the dispatcher writes it as JSON

    counts = torch.randint(1, 500, (2, 16))
    (tmp_path / "load.json").write_text(json.dumps({"expert_load": counts.tolist()}))
    save_file({"expert_load": counts}, str(tmp_path / "load.safetensors"))
    assert torch.equal(read_loads(str(tmp_path / "load.json")), counts)
    assert torch.equal(read_loads(str(tmp_path / "load.safetensors")), counts)
    res = run({"loads": str(tmp_path / "load.safetensors"), "gpus": "4", "nodes": "2", "groups": "4", "reps": "1"})
    (row,) = res["cases"]
    assert row["case"] == "loads:load.safetensors" and row["replicas"] == 20 and row["layers"] == 2
    (tmp_path / "bad.json").write_text(json.dumps({"load": []}))
    with pytest.raises(ValueError, match="expert_load"):
        read_loads(str(tmp_path / "bad.json"))
