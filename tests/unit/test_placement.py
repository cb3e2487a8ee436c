"""Redundant experts at serving time: ReplicatedExperts keeps greedy outputs token-for-token equal to LocalExperts
under any placement / replica count / live re-plan; the placement seeded from training's expert_load.safetensors
balances held-out prompts better than the trivial one; the redundancy policy's hysteresis; the controller's scale-up
and its serving metrics; the dashboard's serving section."""
from __future__ import annotations

import copy
import json
import pathlib
import sys
import warnings

import numpy as np
import pytest
import torch

from raymoe.engine import (EngineConfig, ExpertsConfig, LLMEngine, Placement, ReplicatedExperts, SamplingParams,
                           initial_placement, read_expert_load, write_expert_load)
from raymoe.engine.placement import align_load, slots_for
from raymoe.engine.redundancy import Decision, PolicyConfig, RedundancyController, RedundancyPolicy
from raymoe.engine.tiny import tiny_corpus

warnings.filterwarnings("ignore")
REPO = pathlib.Path(__file__).resolve().parents[2]

GEN = 10
PROMPTS = ["The river runs past", "She counted the stars: one, two", "Every expert in the layer reads",
           "When the memory is full, the newest request waits, and its tokens are"]
# held-out: not lines of the tiny training text, same vocabulary
HELD_OUT = ["The baker counts the boats under the old bridge while the rain falls on the street.",
            "A large dog waits by the mill, and the children run to the river in the morning.",
            "The model writes one token, checks the guess, and the server sends the answer.",
            "Ten stars and nine boats: the fox jumps, the stream is loud, the shop is open.",
            "When the table of blocks is full, the request waits for memory and is computed later.",
            "The router sends each token to an expert, and the expert reads only its own tokens."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt


@pytest.fixture(scope="module")
def base(tiny_base):
    return tiny_base


def make_engine(base, backend=None, spec: int = 1) -> LLMEngine:
    model, tok, eos = base
    return LLMEngine(copy.deepcopy(model), tok, EngineConfig(num_speculative_tokens=spec, block_size=8), eos,
                     expert_backend=backend)


def greedy(engine: LLMEngine, prompts=PROMPTS, n: int = GEN) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0))]


@pytest.fixture(scope="module")
def refs(base):
    return greedy(make_engine(base))


LAYER_KEYS = ["layers.1", "layers.2", "mtp.0"]  # tiny: first_k_dense_replace=1, 3 layers, 1 MTP block


def skewed_load(seed: int, L: int = 3, E: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.empty(L, E).log_normal_(0.0, 1.5, generator=g) * 100


# ------------------------------------------------------------------------------------------------ data path
@pytest.mark.parametrize("shards,slots,load_seed", [(4, 12, None), (2, 8, None), (8, 16, 1), (3, 9, 2), (1, 10, 3)])
def test_replicated_greedy_matches_local(base, refs, shards, slots, load_seed) -> None:
    pl = (Placement.trivial(LAYER_KEYS, 8, slots, shards) if load_seed is None
          else Placement.from_load(LAYER_KEYS, skewed_load(load_seed), slots, shards, 2, 1))
    if load_seed is not None:
        assert int(pl.logcnt.max()) > 1  # the hot experts really are replicated
    backend = ReplicatedExperts(pl)
    eng = make_engine(base, backend)
    assert greedy(eng) == refs
    assert backend.calls > 0 and len(backend.shards) == shards
    # every routed row ran exactly once: per layer, slot rows == logical rows of the window
    assert torch.equal(backend.recorder.slot.sum(1), backend.recorder.window_load().sum(1))


def test_split_spreads_each_expert_over_its_replicas() -> None:
    load = torch.tensor([[50.0, 1, 1, 1, 1, 1, 1, 1]] * 3)
    pl = Placement.from_load(LAYER_KEYS, load, 12, 4, 1, 1)
    reps = pl.replica_slots(0)
    assert len(reps[0]) == 5  # 4 redundant slots all go to the hot expert
    be = ReplicatedExperts(pl)
    from raymoe.model.moe import RoutedExperts

    for k in LAYER_KEYS:
        be.register(k, RoutedExperts(8, 4, 4))
    be._apply(pl)
    counts = torch.tensor([13, 2, 0, 1, 3, 0, 4, 1])
    slot_len, idx = be._split("layers.1", counts)
    assert sorted(idx.tolist()) == list(range(int(counts.sum())))  # a permutation of the rows
    for e, slots in enumerate(reps):
        got = sorted(slot_len[slots].tolist())
        c, r = int(counts[e]), len(slots)
        assert got == sorted([c // r + (1 if j < c % r else 0) for j in range(r)])  # even split
        # the replicas of e receive exactly e's rows (the rows [off_e, off_e + c))
        off = int(counts[:e].sum())
        starts = torch.cumsum(slot_len, 0) - slot_len
        rows = sorted(int(i) for p in slots for i in idx[starts[p]: starts[p] + slot_len[p]])
        assert rows == list(range(off, off + c))


def test_live_replan_and_resize_keep_outputs(base, refs) -> None:
    # ignore_eos fixes the token count (4 prompts of >= 5 tokens + 4 x GEN generated = 60 or more), so the number of
    # re-plans does not depend on where this host's greedy text reaches EOS: every forward adds at most 28 tokens
    # (the prefill), so 60 tokens at one re-plan per 16 give at least two.
    every = SamplingParams(max_tokens=GEN, temperature=0, ignore_eos=True)
    ref_long = [o.outputs[0].token_ids for o in make_engine(base).generate(PROMPTS, every)]
    backend = ReplicatedExperts(num_shards=4, num_slots=12, replan_every_tokens=16, window_tokens=200)
    eng = make_engine(base, backend)
    assert [o.outputs[0].token_ids for o in eng.generate(PROMPTS, every)] == ref_long
    replans = [e for e in backend.events if e["kind"] == "replan"]
    assert len(replans) >= 2, backend.events
    assert all(e["pause_s"] < 1.0 and e["moved_slots"] >= 0 for e in replans)
    assert backend.placement.source == "replan"
    ev = backend.replan(num_shards=6, kind="scale_up")  # a resize between generate calls
    assert ev["num_slots"] == 18 and len(backend.shards) == 6
    assert greedy(eng) == refs
    backend.replan(num_shards=3, kind="scale_down")
    assert len(backend.shards) == 3 and greedy(eng) == refs


# ------------------------------------------------------------------------------------------------ placement
def test_load_file_roundtrip_and_alignment(tmp_path) -> None:
    load = skewed_load(0, L=3)
    p = write_expert_load(tmp_path, load, window_steps=50, step=1234)
    assert p.name == "expert_load.safetensors"
    back, meta = read_expert_load(tmp_path)
    assert torch.equal(back, load.float()) and meta == {"window_steps": "50", "step": "1234"}
    # a file without the MTP row: the MTP layer gets a uniform row
    a = align_load(load[:2], LAYER_KEYS, 8)
    assert torch.equal(a[:2], load[:2]) and torch.allclose(a[2], torch.full((8,), float(load[:2].mean())))
    with pytest.raises(ValueError, match="experts per row"):
        align_load(load[:, :4], LAYER_KEYS, 8)
    cfg = ExpertsConfig(backend="replicated", num_shards=4, redundant_slots=4)
    pl, used = initial_placement(LAYER_KEYS, 8, cfg, tmp_path, n_group=2)
    assert pl.source.startswith("load-file(step=1234") and torch.equal(used, load)
    ref = Placement.from_load(LAYER_KEYS, load, 12, 4, 2, 1)
    assert torch.equal(pl.phy2log, ref.phy2log)
    pl0, none = initial_placement(LAYER_KEYS, 8, cfg, tmp_path / "nothing")
    assert pl0.source == "trivial" and none is None
    assert slots_for(8, cfg, 5) == 15 and slots_for(8, cfg, 3) == 9


def _shard_balance(slot_rows_LR: np.ndarray, num_shards: int) -> float:
    """Independent reference: mean over layers of max/mean per-shard rows."""
    vals = []
    for row in slot_rows_LR:
        per = [sum(row[s * (len(row) // num_shards):(s + 1) * (len(row) // num_shards)]) for s in range(num_shards)]
        vals.append(max(per) / (sum(per) / num_shards))
    return float(np.mean(vals))


def test_load_seeded_placement_beats_trivial_on_held_out(base, ckpt, tmp_path) -> None:
    # "training's" expert load: the router counts over the training text (written in training's file format)
    rec = ReplicatedExperts(num_shards=1, num_slots=8)
    greedy(make_engine(base, rec, spec=0), tiny_corpus(1)[:6], n=2)
    train_load = rec.recorder.window_load()[:2]  # main MoE layers only (spec off: the MTP row is empty)
    served = tmp_path / "served"
    served.mkdir()
    for f in ckpt.iterdir():
        (served / f.name).symlink_to(f)
    write_expert_load(served, train_load, window_steps=1, step=30)
    results = {}
    for name in ("trivial", "seeded"):
        cfg = ExpertsConfig(backend="replicated", num_shards=4, redundant_slots=4,
                            load_file=None if name == "seeded" else str(tmp_path / "absent"))
        if name == "trivial":
            be = ReplicatedExperts(num_shards=4, num_slots=12)
        else:
            be = ReplicatedExperts.from_config(cfg, served)
        eng = make_engine(base, be, spec=0)
        out = greedy(eng, HELD_OUT, n=GEN)
        slot = be.recorder.slot.numpy()[:2]  # the main MoE layers (the MTP block idles with spec off)
        ref = _shard_balance(slot, 4)
        got = float(be.measured_balance()[:2].mean())
        assert got == pytest.approx(ref, rel=1e-12)
        results[name] = (ref, out, be.placement.source)
    assert results["seeded"][2].startswith("load-file") and results["trivial"][2] == "trivial"
    assert results["seeded"][1] == results["trivial"][1]  # same tokens either way
    print(f"held-out balance: trivial {results['trivial'][0]:.3f} seeded {results['seeded'][0]:.3f}")
    assert results["seeded"][0] < results["trivial"][0] - 0.1, results


# ------------------------------------------------------------------------------------------------ policy
def test_policy_hysteresis_cooldown_bounds_rollback() -> None:
    pol = RedundancyPolicy(PolicyConfig(min_shards=2, max_shards=4, up_balance=1.3, down_balance=1.05, patience=2,
                                        cooldown_s=10, min_tokens=100, rollback_drop=0.25, rollback_hold_s=100))
    assert pol.decide(1.5, 100, 2, now=0, tokens=50).action == "keep"  # too little evidence (but counts patience)
    d = pol.decide(1.5, 100, 2, now=1)
    assert d == Decision("add", 3, d.reason) and "1.500" in d.reason
    pol.applied(d, 1, 100)
    assert pol.decide(1.6, 100, 3, now=5).action == "keep"  # cooldown
    assert pol.decide(1.2, 100, 3, now=20).action == "keep"  # inside the band: never changes
    assert pol.decide(1.1, 100, 3, now=21).action == "keep"
    # throughput fell by > 25 % after the add: roll back, then hold adds
    d = pol.decide(1.2, 60, 3, now=22)
    assert d.action == "remove" and d.target == 2 and d.reason.startswith("rollback")
    pol.applied(d, 22, 60)
    pol.decide(1.5, 60, 2, now=40)
    assert pol.decide(1.5, 60, 2, now=41).reason == "adds held after a rollback"
    pol.decide(1.5, 60, 2, now=130)
    d = pol.decide(1.5, 60, 2, now=131)
    assert d.action == "add"
    pol.applied(d, 131, 60)
    # at max: keep; well balanced for `patience` observations: remove, never below min_shards
    pol2 = RedundancyPolicy(PolicyConfig(min_shards=2, max_shards=3, patience=1, cooldown_s=0, min_tokens=0))
    assert pol2.decide(2.0, 10, 3, now=0).action == "keep"
    assert pol2.decide(1.01, 10, 3, now=1) == Decision("remove", 2, pol2.history[-1]["reason"])
    assert pol2.decide(1.01, 10, 2, now=2).action == "keep"
    assert pol2.decide(1.0, 10, 5, now=3).action == "remove"  # out of bounds is corrected
    with pytest.raises(ValueError):
        PolicyConfig(up_balance=1.1, down_balance=1.2)


def test_controller_scales_up_under_skew_and_logs_metrics(base, refs, tmp_path) -> None:
    from raymoe.config import LoggerConfig
    from raymoe.metrics import MetricsLogger

    backend = ReplicatedExperts(num_shards=2, num_slots=8)  # no redundancy yet
    eng = make_engine(base, backend)
    logger = MetricsLogger(tmp_path / "serve_run", LoggerConfig(kind="none"), {})
    t = [0.0]
    ctl = RedundancyController(backend, RedundancyPolicy(PolicyConfig(
        min_shards=2, max_shards=4, up_balance=1.05, down_balance=1.01, patience=1, cooldown_s=0, min_tokens=16)),
        logger=logger, decide_every_steps=4, metrics_every_steps=2, clock=lambda: t[0])
    sp = SamplingParams(max_tokens=GEN, temperature=0)
    ids = [eng.add_request(None, p, sp) for p in PROMPTS]
    final = {}
    while eng.has_unfinished():
        outs = eng.step()
        t[0] += 0.1
        ctl.after_step(outs, eng.stats["generation_tokens"])
        final.update({o.request_id: o.outputs[0].token_ids for o in outs if o.finished})
    logger.finish()
    assert [final[i] for i in ids] == refs  # scaling mid-generation changes no token
    ups = [d for d in ctl.decisions if d["action"] == "add"]
    assert ups and ups[0]["num_shards"] == 3 and ups[0]["redundant_slots"] == 4
    assert ups[0]["planned_balance_after"] < ups[0]["planned_balance_before"]
    recs = [json.loads(l) for l in (tmp_path / "serve_run" / "metrics.jsonl").read_text().splitlines()]
    assert any("serving/scale_event_ms" in r for r in recs)
    last = recs[-1]
    for k in ("serving/balance", "serving/num_shards", "serving/redundant_slots", "serving/slot_load",
              "serving/placement", "serving/balance/layer_0", "serving/shard_load/shard_0", "serving/ttft_s",
              "serving/tpot_s"):
        assert k in last or any(k in r for r in recs), k
    assert "serving/initial_placement" in recs[0]
    assert max(r["serving/num_shards"] for r in recs) >= 3
    # the logged balance is the measured one: recompute it from the logged per-slot rows
    r = recs[-1]
    assert r["serving/balance"] == pytest.approx(_shard_balance(np.array(r["serving/slot_load"]),
                                                                r["serving/num_shards"]))
    # ... and the dashboard renders its serving section
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    from dashboards.render_local import render

    paths = render(tmp_path / "serve_run", tmp_path / "report")
    assert {"serving", "serving_slot_load", "serving_placement"} <= set(paths), set(paths)
    assert "loss" not in paths
    assert paths["serving"].stat().st_size > 10_000
