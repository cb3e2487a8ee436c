"""A non-finite latent of one sequence never reaches another sequence's outputs, in every cache view where keys of
several sequences (or stale / padding slots) meet in one attention product: the packed row (``PackedBatch``, all
sequences' keys behind a block-diagonal mask), the row-per-token view (``DecodeBatch``: padding slots read block 0,
the tail of a sequence's last block holds whatever its previous owner left there) and a prefill step's absorbed
short rows (``PrefillBatch.short``). The poisoned sequence's own rows stay non-finite, so its request ends with an
error as before (the engine's per-row ``isfinite`` check); the others' logits in that very step equal those of the
same step without the NaN, and they finish with the greedy text of a clean run. Two sources of NaN: latents
overwritten in the cache (a corrupted cache), and a prompt token whose embedding row is NaN (a real forward)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from raymoe.engine import EngineConfig, LLMEngine, SamplingParams
from raymoe.model import cpu_kernels
from raymoe.model.layers import enable_fused_weight_cache, use_native_linears

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

GEN = 8
PROMPTS = ["The river runs past the old mill", "When the memory is full, the newest request waits",
           "A block of memory holds sixteen tokens", "Every request ends on its own"]
LATE = "A late prompt arrives while the others decode, long enough to be a chunk"
ERROR = "FloatingPointError: the model produced non-finite logits for this request"
# (fast_decode, expanded_prefill): which view serves the decode rows of the step the NaN meets
VIEWS = {"packed": dict(fast_decode=False, expanded_prefill=False),
         "decode": dict(fast_decode=True, expanded_prefill=True),
         "prefill_short_rows": dict(fast_decode=True, expanded_prefill=True)}


class Recorder:
    """Runs a real engine step by step, recording each step's logits ``[rows, V]`` and the request of every row (the
    engine's own ``_forward`` and scheduler, observed, not replaced)."""

    def __init__(self, eng: LLMEngine) -> None:
        self.eng, self.logits, self.rows = eng, [], []
        forward, schedule = eng._forward, eng.scheduler.schedule

        def rec_forward(ids, segments, logit_rows):
            h, logits = forward(ids, segments, logit_rows)
            self.logits.append(logits.clone())
            return h, logits

        def rec_schedule():
            sched = schedule()
            self.rows.append([s.seq.group.request_id for s in sched
                              if s.seq.num_computed + s.num_tokens == len(s.seq.tokens)])
            return sched

        eng._forward, eng.scheduler.schedule = rec_forward, rec_schedule  # type: ignore[method-assign]
        self.final: dict[str, object] = {}

    def step(self) -> None:
        for o in self.eng.step():
            if o.finished:
                self.final[o.request_id] = o

    def run(self) -> None:
        for _ in range(200):
            if not self.eng.has_unfinished():
                return
            self.step()
        raise AssertionError("engine did not finish")


def engine(base, model=None, **kw) -> LLMEngine:
    m, tok, eos = base
    cfg = dict(block_size=4, num_blocks=256, prefill_chunk=64, max_num_batched_tokens=256)
    return LLMEngine(model if model is not None else copy.deepcopy(m), tok, EngineConfig(**cfg, **kw),
                     eos_token_id=eos)


def assert_step_isolated(clean: Recorder, bad: Recorder, step: int, victim: str) -> None:
    """Step ``step``: the victim's rows are non-finite; every other row equals the clean run's."""
    assert clean.rows[step] == bad.rows[step] and victim in bad.rows[step]
    lc, lb = clean.logits[step], bad.logits[step]
    others = [i for i, r in enumerate(bad.rows[step]) if r != victim]
    mine = [i for i, r in enumerate(bad.rows[step]) if r == victim]
    assert len(others) >= 2
    assert not torch.isfinite(lb[mine]).all(dim=-1).any()
    assert torch.isfinite(lb[others]).all()
    torch.testing.assert_close(lb[others], lc[others], atol=1e-6, rtol=1e-6)


def assert_others_finish_as_clean(clean: Recorder, bad: Recorder, victim: str) -> None:
    assert bad.final[victim].error == ERROR
    assert clean.final[victim].error is None
    for rid, ref in clean.final.items():
        if rid != victim:
            assert bad.final[rid].error is None, (rid, bad.final[rid].error)
            assert bad.final[rid].outputs[0].token_ids == ref.outputs[0].token_ids
            assert bad.final[rid].outputs[0].text == ref.outputs[0].text
    assert bad.eng.cache.allocator.num_used == 0 and not bad.eng.groups


@pytest.mark.parametrize("kernels", ["off", "on"])
@pytest.mark.parametrize("view", list(VIEWS))
def test_nan_latents_in_one_sequences_cache_blocks_stay_in_that_sequence(tiny_base, view, kernels) -> None:
    """After every prompt is prefilled, NaN is written over the whole blocks of the request that owns block 0 (the
    padding block of the row view), every layer; the next step (a decode step in the view under test; for
    ``prefill_short_rows`` a late prompt's chunk joins it, so the decode rows run as a prefill step's short rows).
    ``kernels``: ``engine.cpu_kernels`` (on: the decode rows attend through the native kernel, in place)."""
    if kernels == "on" and not cpu_kernels.available():
        pytest.skip(f"CPU kernels unavailable here: {cpu_kernels.why_unavailable()}")
    sp = SamplingParams(max_tokens=GEN, temperature=0.0, ignore_eos=True)
    runs = []
    for poison in (False, True):
        rec = Recorder(engine(tiny_base, **VIEWS[view], cpu_kernels=kernels))
        assert rec.eng.cache.cpu_kernels == (kernels == "on")
        for i, p in enumerate(PROMPTS):
            rec.eng.add_request(f"r{i}", p, sp)
        rec.step()  # every prompt prefilled (one step: chunk 64, budget 256)
        assert all(len(s.output_ids) == 1 for g in rec.eng.groups.values() for s in g.seqs)
        victim = next(g.request_id for g in rec.eng.groups.values() if 0 in g.seqs[0].block_table)
        if view == "prefill_short_rows":
            rec.eng.add_request("late", LATE, sp)
        if poison:
            c = rec.eng.cache
            bt = torch.tensor(rec.eng.groups[victim].seqs[0].block_table)
            slots = (bt[:, None] * c.block_size + torch.arange(c.block_size)).flatten()
            c.buf[:, slots] = float("nan")
        paths = dict(rec.eng.forward_paths)
        rec.step()
        taken = {k for k in paths if rec.eng.forward_paths[k] > paths[k]}
        assert taken == {{"packed": "packed", "decode": "decode", "prefill_short_rows": "prefill"}[view]}
        rec.run()
        runs.append((rec, victim))
    (clean, v0), (bad, victim) = runs
    assert v0 == victim
    assert_step_isolated(clean, bad, 1, victim)
    assert_others_finish_as_clean(clean, bad, victim)


@pytest.mark.parametrize("view", ["packed", "expanded"])
def test_nan_prompt_in_a_multi_prompt_prefill_step_ends_only_its_request(tiny_base, view) -> None:
    """One prompt holds a token whose embedding row is NaN; it is prefilled in the same step as three others (one
    packed row, or expanded prefill). Only that request fails; the others' logits of that
    step equal those of the model without the NaN row, and their text is the clean run's. Then new requests reuse
    the failed request's freed blocks (their stale NaN tails are masked keys) and also match the clean run."""
    model, tok, _ = tiny_base
    prompts = [tok.encode(p).ids for p in PROMPTS]
    used = {t for p in prompts for t in p} | {t for t in tok.encode(LATE).ids}
    poison = next(t for t in range(model.config.vocab_size) if t not in used)
    prompts[1] = prompts[1][:5] + [poison] + prompts[1][5:]
    bad_model = copy.deepcopy(model)
    with torch.no_grad():
        bad_model.embed_tokens.weight[poison] = float("nan")
    cfg = {"packed": dict(fast_decode=False, expanded_prefill=False),
           "expanded": dict(fast_decode=True, expanded_prefill=True)}[view]
    sp = SamplingParams(max_tokens=GEN, temperature=0.0, ignore_eos=True)
    runs = []
    for m in (model, bad_model):
        rec = Recorder(engine(tiny_base, model=copy.deepcopy(m), **cfg))
        for i, p in enumerate(prompts):
            rec.eng.add_request(f"r{i}", p, sp)
        rec.step()
        rec.run()
        # the freed blocks (NaN latents where the failed prompt left them) go to new requests
        for i, p in enumerate([LATE, PROMPTS[0], PROMPTS[2]]):
            rec.eng.add_request(f"again{i}", p, sp)
        rec.run()
        runs.append(rec)
    clean, bad = runs
    path = {"packed": "packed", "expanded": "prefill"}[view]
    assert bad.eng.forward_paths[path] > 0
    assert_step_isolated(clean, bad, 0, "r1")
    assert_others_finish_as_clean(clean, bad, "r1")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("view", ["packed", "decode", "decode_native", "decode_layer"])
def test_absorbed_attention_keeps_a_non_finite_latent_in_its_sequence(view, bad, monkeypatch, tiny_mla_paged) -> None:
    """One MLA layer over a cache view: one cached latent value of sequence 0 (which owns block 0, the row view's
    padding block) made NaN / ±inf. Every row of sequence 0 is non-finite; every other row is exactly the output
    without it (same shapes, same kernels: the masked key contributes 0 either way; ``decode_native``: the native
    kernel reads no key a row does not see)."""
    if view.startswith("decode_") and not cpu_kernels.available():
        pytest.skip(f"CPU kernels unavailable here: {cpu_kernels.why_unavailable()}")
    calls = []
    name = "mla_decode_layer" if view == "decode_layer" else "mla_decode_absorbed"  # the native path under test
    native = getattr(cpu_kernels, name)
    monkeypatch.setattr(cpu_kernels, name, lambda *a: calls.append(1) or native(*a))
    m, mla, c, tables = tiny_mla_paged
    assert tables[0][0] == 0
    c.cpu_kernels = view.startswith("decode_")
    if view == "decode_layer":  # the whole layer in one native call (as the engine serves it with its CPU kernels)
        enable_fused_weight_cache(mla, native=True)
        use_native_linears(mla)
        mla.native = True
    clean = c.buf.clone()
    # decode tokens at 5 and 2, a 3-token draft verification at 8..10
    segments = [(tables[0], 5, 1), (tables[1], 8, 3), (tables[2], 2, 1)]
    x = torch.randn(5, m.config.hidden_size)
    outs = []
    for poison in (False, True):
        c.buf.copy_(clean)
        if poison:
            c.buf[0, tables[0][0] * 4 + 1, 7] = bad  # position 1 of sequence 0, one latent value
        v = c.batch(segments) if view == "packed" else c.decode_batch(segments)
        cos, sin = m.rotary(v.positions(5 if view == "packed" else 1, "cpu"))
        xs = x[None] if view == "packed" else x[:, None]
        with torch.no_grad():
            o = mla(xs, cos, sin, v)
        outs.append(o[0] if view == "packed" else o[:, 0])
    ref, got = outs
    assert len(calls) == (2 if view.startswith("decode_") else 0)  # the native kernel served both runs (or none)
    assert torch.isfinite(ref).all()
    assert not torch.isfinite(got[0]).any()
    assert torch.equal(got[1:], ref[1:])


def test_cached_blocks_a_failed_request_read_leave_the_prefix_cache(tiny_base) -> None:
    """A corrupted cache (every latent NaN) after one request finished: the next request with the same prompt reuses
    its cached prefix and fails; that failure takes the prefix out of the cache, so the one after recomputes it and
    gives the first request's greedy text (without that, every later request with this prefix would fail too)."""
    sp = SamplingParams(max_tokens=GEN, temperature=0.0, ignore_eos=True)
    rec = Recorder(engine(tiny_base))
    eng, c = rec.eng, rec.eng.cache
    rec.eng.add_request("first", PROMPTS[1], sp)
    rec.run()
    ref = rec.final["first"]
    assert ref.error is None and c.allocator.num_cached > 0
    c.buf[:] = float("nan")
    hits, cached = eng.metrics()["prefix_cache_hits"], c.allocator.num_cached
    eng.add_request("reuses", PROMPTS[1], sp)
    rec.run()
    reused = eng.metrics()["prefix_cache_hits"] - hits
    assert reused > 0 and rec.final["reuses"].error == ERROR
    # the prompt blocks it read are gone (the blocks of the first request's generated tail stay: nobody read them)
    assert c.allocator.num_cached == cached - reused // c.block_size
    eng.add_request("again", PROMPTS[1], sp)
    rec.run()
    again = rec.final["again"]
    assert again.error is None and again.num_cached_tokens == 0
    assert again.outputs[0].token_ids == ref.outputs[0].token_ids and again.outputs[0].text == ref.outputs[0].text
    assert c.allocator.num_cached > 0 and c.allocator.num_used == 0
