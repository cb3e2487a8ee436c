"""`python -m raymoe.jobs.bench serve`: the engine vs transformers, MTP speculation, the Serve app under load.

Three parts, each a table (rich) and a section of the returned JSON; one PNG (``plot=``, default
``bench_results/serve_latency.png``) with latency vs offered load.

1. **decode** — greedy decode tokens/s of our engine (:class:`raymoe.engine.LLMEngine`, continuous batching over the
   paged latent cache) vs ``transformers`` ``DeepseekV3ForCausalLM.generate`` on the same weights (our HF
   export), batch 1 and 16 (``batches=1,16``), per model (``model=tiny,small``): ``tiny`` is the trained tiny
   checkpoint of :mod:`raymoe.engine.tiny`, ``small`` random-init weights of the ``small`` preset, ``hf=<dir>`` any HF
   DeepseekV3 export (e.g. ``runs/<run>/hf``) instead. Prompts are ``prompt_len`` random token ids (the same for both),
   ``new_tokens`` tokens are generated with EOS ignored. Each generation is timed in parts: **prefill** (until every
   request has its first token; for transformers, until ``generate``'s streamer receives the first tokens), the
   **decode steps** after it, each timed directly (ours: the engine's decode-only steps once every prefill finished;
   transformers: the intervals between streamed tokens), and **end to end**; medians over ``reps`` interleaved
   rounds. With ``compare_prefill=1`` (default) our engine also runs with ``engine.expanded_prefill=false`` (prompt
   chunks through the absorbed MLA path), and its prefill and end-to-end ratios are printed in parentheses, and with
   ``engine.cache.group_prefill = False`` (one SDPA call per prompt chunk instead of one per chunk shape): ``prefill
   loop/grouped`` is its prefill time over ours. When
   the checkpoint has an MTP module, ours also runs with ``decode_spec`` (default 1; 0 turns it off) MTP drafts per
   step: the same greedy tokens in fewer target forwards. The generated token ids of every implementation are compared and must be
   equal (the bench fails otherwise). Each row also reports the **bandwidth floor** of a decode step: the weights it
   must read (all but the token embedding, with the routed experts the batch actually touched, counted per layer
   with a forward hook) plus the latent cache it reads (:func:`latent_cache_bytes`, at the timed steps' mean context),
   divided by this machine's streaming read bandwidth, measured in the same run with the same intra-op threads
   (:func:`streaming_read`), once before and once after every timed generation: the median of those (their range is
   in the JSON), so a shared host's drift during the run moves the floor as it moves the steps. ``HF step / floor`` is the largest speed-up over transformers that any implementation
   reading fp32 weights at that bandwidth could reach. A measured step faster than its floor is impossible: the
   bench raises. Next to it, the **compute floor**: the step's flops at this machine's fp32 matmul rate, measured in
   the same run (a step of B rows does 2·B flops per weight read). With ``compare_kernels=1`` (default) our engine
   also runs with ``engine.cpu_kernels=off`` (every product through torch's BLAS instead of
   :mod:`raymoe.model.cpu_kernels`), its step in parentheses.
2. **mtp** — speculative decoding with the checkpoint's MTP module (``hf=`` or the tiny checkpoint): greedy
   generations from prompts cut out of **held-out text** (the validation plays of the Shakespeare corpus, the split
   :func:`raymoe.data.corpus.split_documents` makes for training), ``k = 1, 2`` drafts per step (``spec=1,2``):
   draft acceptance rate, tokens emitted per target (verify) forward, decode speed vs no speculation; the outputs
   must equal the non-speculative ones (the bench fails otherwise).
3. **load** — the Ray Serve app (:func:`raymoe.jobs.serve.start_server`, 127.0.0.1) driven by an async load generator
   with the real ``openai`` client (``AsyncOpenAI``, streaming completions): closed loop at each concurrency of
   ``conc=1,4,16`` (``load_requests`` requests per level, ``load_timeout`` seconds at most), TTFT and TPOT p50/p99
   and tokens/s. The same prompts at the same concurrency through an in-process engine with the same config give the
   cost of the Serve hop (HTTP + proxy + ingress + handle streaming). An existing Ray (``ray.is_initialized()``) is
   reused and left running; otherwise a local one is started and shut down.

4. **prefix** — prefix caching in the engine, on vs off, same engine config, same prompts, interleaved rounds
   (``reps``): ``prefix_requests`` greedy requests in a closed loop of ``prefix_conc`` in flight (a new one joins
   the running batch as soon as one finishes), ``prefix_new_tokens`` tokens each, on two traces of random token ids: **distinct** (every prompt ``prefix_len + prefix_suffix`` fresh
   tokens: 0% hit rate, so on/off is the cost of hashing and registering blocks) and **shared** (``prefix_groups``
   groups whose requests share a ``prefix_len``-token prefix and differ in ``prefix_suffix`` tokens, interleaved
   across groups). Fresh prompts every round, so nothing is reused across rounds. Reports wall time, requests/s,
   the hit rate and on/off; the generated ids with the cache on must equal those with it off (the bench fails
   otherwise). Models as for ``decode`` (``model=tiny,small`` or ``hf=``).

5. **load_rates** — the Serve app under **open-loop** load: Poisson arrivals at offered rates ``rates=1,2,4,8``
   (requests/s) on a shared-prefix and a random trace, prefix caching on and off; offered / achieved req/s, output
   tokens/s, TTFT and TPOT p50/p99, failures and the prefix-cache hit rate from ``usage``; a table and
   ``rates_plot=`` (default ``bench_results/serve_load_rates.png``). See :mod:`raymoe.jobs.benches.serve_load`.

6. **prefill_attn** — one MLA layer of each ``model`` preset (random weights) over a prefill step of B fresh prompts
   of L tokens (``prefill_shapes=16x256,64x32,64x16``): the expanded prefill attention with one SDPA call for the B
   same-shape chunks vs one call per chunk (``PagedLatentCache.group_prefill``), outputs checked equal within 1e-5,
   minimum of ``reps`` interleaved rounds.

Choose parts with ``parts=decode,mtp,load,prefix,load_rates,prefill_attn`` (default: the first three); ``threads=1``
(default): intra-op threads for both implementations.
Numbers are for the machine they ran on; ratios are measured side by side.
"""
from __future__ import annotations

import asyncio
import os
import pathlib
import socket
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Optional

from raymoe.jobs.cluster import configure_process_env

configure_process_env()  # before `import ray`: embedded (loopback only) or cluster mode, see raymoe.jobs.cluster

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from raymoe.jobs.benches import matmul_peak, median_seconds  # noqa: E402

console = Console() if sys.stdout.isatty() else Console(width=160)  # logs/pipes: no 80-column squeeze

__all__ = ["run", "decode_bench", "mtp_bench", "load_bench", "prefix_bench", "heldout_text", "plot_latency"]


def _ints(s: str) -> list[int]:
    return [int(x) for x in str(s).split(",") if x.strip()]


def _pct(xs: list[float], q: float) -> Optional[float]:
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[i]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- checkpoints
def tiny_checkpoint(root: pathlib.Path, train_steps: int = 30) -> pathlib.Path:
    """The trained tiny checkpoint of :mod:`raymoe.engine.tiny` (built once per bench run, single thread)."""
    from raymoe.engine.tiny import build_tiny_checkpoint

    if (root / "tiny" / "config.json").exists():
        return root / "tiny"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_tiny_checkpoint(root / "tiny", seed=0, train_steps=train_steps)
    finally:
        torch.set_num_threads(n)


def _random_checkpoint(name: str, root: pathlib.Path) -> pathlib.Path:
    from raymoe.config import ModelConfig
    from raymoe.model import DeepSeekV3, hf

    torch.manual_seed(0)
    model = DeepSeekV3(ModelConfig.preset(name).replace(num_nextn_predict_layers=0))
    path = root / name
    hf.save(model, path)
    return path


def _checkpoints(args: dict[str, str], root: pathlib.Path) -> dict[str, pathlib.Path]:
    if args.get("hf"):
        p = pathlib.Path(args["hf"]).resolve()
        if not (p / "config.json").exists():
            raise SystemExit(f"hf={p} is not a HF checkpoint directory (no config.json)")
        return {f"hf:{p.parent.name}/{p.name}" if p.name == "hf" else f"hf:{p.name}": p}
    out = {}
    for name in [m for m in args.get("model", "tiny,small").split(",") if m]:
        out[name] = (tiny_checkpoint(root, int(args.get("tiny_steps", 30))) if name == "tiny"
                     else _random_checkpoint(name, root))
    return out


# ---------------------------------------------------------------------------------------------- 1. decode
def _engine(path: pathlib.Path, **cfg):
    from raymoe.engine import EngineConfig, LLMEngine

    return LLMEngine.from_pretrained(path, EngineConfig(**cfg))


def streaming_read(model: torch.nn.Module, reps: int = 5) -> tuple[float, float, float]:
    """``(bandwidth bytes/s, routed MB per expert and layer, other MB)`` of what a decode step reads: every parameter
    but the token embedding (gathered, not read whole) and the MTP modules. Bandwidth is measured on this machine now
    as the median time of one ``sum`` per tensor over all of them (for ``small`` ~400 MB, far beyond any cache; a
    tiny model's few MB stay cached, but its steps are bound by per-op overhead, not by bandwidth)."""
    from raymoe.model.moe import RoutedExperts

    named = [(n, p.detach()) for n, p in model.named_parameters() if "embed_tokens" not in n and not n.startswith("mtp.")]
    total = sum(p.numel() * p.element_size() for _, p in named)
    routed = [m for n, m in model.named_modules() if isinstance(m, RoutedExperts) and not n.startswith("mtp.")]
    routed_bytes = sum(p.numel() * p.element_size() for m in routed for p in m.parameters())
    per_expert = routed_bytes / max(sum(m.num_experts for m in routed), 1)

    def read() -> None:
        for _, p in named:
            p.sum()

    return total / median_seconds(read, reps, warmup=1), per_expert / 1e6, (total - routed_bytes) / 1e6


def latent_cache_bytes(model: torch.nn.Module, batch: int, context: float) -> float:
    """Bytes of latent cache one decode step of ``batch`` sequences at mean ``context`` keys reads: every layer's
    ``C + R`` values per key (the absorbed attention reads each key once), in the weights' dtype (the engine's cache
    dtype)."""
    cfg = model.config
    esize = next(model.parameters()).element_size()
    return len(model.layers) * batch * context * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * esize


def decode_part_costs(model: torch.nn.Module, batch: int, context: float,
                      touched_per_layer: float = 0.0) -> dict[str, tuple[float, float]]:
    """``{part: (bytes read, flops)}`` of one decode step of ``batch`` sequences at mean ``context`` keys, for
    the parts ``attention`` (every MLA: its weights and the latent cache, :func:`latent_cache_bytes`; its projections
    once per token — ``kv_b_proj`` is W^UK and W^UV absorbed, each
    value once — plus the absorbed scores and values over ``C + R`` and ``C`` per key and head), ``routed experts``
    (bytes: ``touched_per_layer`` experts per MoE layer; flops: each token's ``k`` experts, gate, up and down),
    ``shared experts``, ``dense FFN``, ``router`` and ``lm_head``. The token embedding, the norms and the MTP modules
    are not counted. ``model``: the training model or the engine's (MoE layers wrapped in ``DispatchedMoE``)."""
    cfg = model.config

    def nbytes(mod: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in mod.parameters() if p.dim() >= 2)

    def nparams(mod: torch.nn.Module) -> int:
        return sum(p.numel() for p in mod.parameters() if p.dim() >= 2)

    moes = [getattr(layer.mlp, "moe", layer.mlp) for layer in model.layers if layer.is_moe]
    shared = [m.shared_experts for m in moes if m.shared_experts is not None]
    dense = [layer.mlp for layer in model.layers if not layer.is_moe]
    attn = [layer.self_attn for layer in model.layers]
    H, C, R = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    core = len(attn) * H * context * (2 * C + R)
    expert_params = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    esize = next(model.parameters()).element_size()
    return {
        "attention": (sum(nbytes(a) for a in attn) + latent_cache_bytes(model, batch, context),
                      2 * batch * (sum(nparams(a) for a in attn) + core)),
        "routed experts": (len(moes) * touched_per_layer * expert_params * esize,
                           2 * batch * len(moes) * cfg.num_experts_per_tok * expert_params),
        "shared experts": (sum(nbytes(m) for m in shared), 2 * batch * sum(nparams(m) for m in shared)),
        "dense FFN": (sum(nbytes(d) for d in dense), 2 * batch * sum(nparams(d) for d in dense)),
        "router": (sum(nbytes(m.router) for m in moes), 2 * batch * sum(nparams(m.router) for m in moes)),
        "lm_head": (nbytes(model.lm_head), 2 * batch * nparams(model.lm_head)),
    }


def decode_flops(model: torch.nn.Module, batch: int, context: float) -> float:
    """Multiply-add flops (×2) of one decode step of ``batch`` sequences at mean ``context`` keys: the sum over
    :func:`decode_part_costs` (every GEMM weight but the token embedding and the MTP modules once per token, each
    token's ``k`` routed experts, the absorbed attention's scores and values)."""
    return float(sum(flops for _, flops in decode_part_costs(model, batch, context).values()))


def touched_experts(model: torch.nn.Module, tokens: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``fn()`` → (mean number of distinct routed experts per MoE layer over the forwards of exactly ``tokens``
    tokens — the decode steps of a batch of ``tokens`` sequences —, 0 when there was none; ``fn()``'s result)."""
    from raymoe.engine.experts import DispatchedMoE

    seen: list[int] = []

    def hook(_m, args, out) -> None:
        if args[0].shape[0] * args[0].shape[1] == tokens:
            seen.append(int((out[1].counts > 0).sum()))

    hs = [m.register_forward_hook(hook) for m in model.layers.modules() if isinstance(m, DispatchedMoE)]
    try:
        result = fn()
    finally:
        for h in hs:
            h.remove()
    return (sum(seen) / len(seen) if seen else 0.0), result


class _StepStamps:
    """A ``generate`` streamer that stamps the time of every ``put``: the prompt, then each step's new tokens."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.t.append(time.perf_counter())

    def end(self) -> None:
        return None


def _timed_generate(e, prompts: torch.Tensor, n: int) -> dict[str, Any]:
    """Our engine on ``prompts`` for ``n`` greedy tokens, stepped here: the ids, the prefill time (until every request
    has its first token), and each **decode-only** step (every prefill finished, the whole batch still running) with
    the tokens it emitted (``B`` per step, more with MTP drafts)."""
    from raymoe.engine import SamplingParams

    sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    ids = [e.add_request(None, p.tolist(), sp) for p in prompts]
    final: dict[str, Any] = {}
    started: set[str] = set()
    prefill_s, steps, emitted = None, [], 0
    while len(final) < len(ids):
        decode_only = prefill_s is not None and not final
        g0 = e.stats["generation_tokens"]
        ts = time.perf_counter()
        outs = e.step()
        te = time.perf_counter()
        if decode_only:
            steps.append(te - ts)
            emitted += e.stats["generation_tokens"] - g0
        for o in outs:
            if o.outputs[0].token_ids:
                started.add(o.request_id)
            if o.finished:
                final[o.request_id] = o
        if prefill_s is None and len(started) == len(ids):
            prefill_s = te - t0
    return {"ids": [final[i].outputs[0].token_ids for i in ids], "total_s": time.perf_counter() - t0,
            "prefill_s": prefill_s, "steps_s": steps, "emitted": emitted}


def _timed_hf(hf_model, prompts: torch.Tensor, n: int) -> dict[str, Any]:
    """transformers' ``generate``, timed the same way through a streamer: prefill = until the first token is
    streamed; decode steps = the intervals between later tokens (each one forward of the whole batch)."""
    st = _StepStamps()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf_model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                                streamer=st)
    total = time.perf_counter() - t0
    tok = st.t[1:]  # st.t[0]: the prompt
    return {"ids": out[:, prompts.shape[1]:].tolist(), "total_s": total, "prefill_s": tok[0] - t0,
            "steps_s": [b - a for a, b in zip(tok, tok[1:])], "emitted": prompts.shape[0] * (len(tok) - 1)}


def decode_bench(name: str, path: pathlib.Path, batches: list[int], prompt_len: int, new_tokens: int,
                 reps: int, spec: int = 1, compare_prefill: bool = True,
                 compare_kernels: bool = True) -> list[dict[str, Any]]:
    """Rows per batch size: ours (MTP off) and, when the checkpoint has an MTP module and ``spec > 0``, ours with
    ``spec`` MTP drafts per step, vs HF ``generate``; all must give the same greedy token ids. ``compare_prefill``:
    also ours with ``engine.expanded_prefill=false`` (prefill chunks through the absorbed path), side by side;
    ``compare_kernels``: also ours with ``engine.cpu_kernels=off`` (torch's GEMMs instead of raymoe's CPU kernels).

    Next to the bandwidth floor each row has a **compute floor**: the step's flops (:func:`decode_flops`) at this
    machine's fp32 matmul rate measured in the same run (:func:`raymoe.jobs.benches.matmul_peak`). A step of B rows
    multiplies B rows by every non-routed weight, 2·B flops per 4 bytes read: past ``peak / bandwidth · 2`` rows per
    weight a step is bound by arithmetic, not by reads, even with perfect kernels.

    Every run of ``new_tokens`` tokens is timed in parts: the prefill (until every request has its first token), the
    decode-only steps after it (each timed directly; medians over all steps of all ``reps``), and end to end. A decode
    step faster than its bandwidth floor is impossible: the bench raises (a measurement bug)."""
    import transformers

    from raymoe.engine.experts import DispatchedMoE

    transformers.logging.set_verbosity_error()  # an export's MTP tensors are "unexpected" to transformers: fine
    hf_model = transformers.DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    hf_model.generation_config = transformers.GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0,
                                                               use_cache=True)
    vocab = hf_model.config.vocab_size
    bmax = max(batches)
    cfg = dict(block_size=16, num_blocks=bmax * ((prompt_len + new_tokens + spec) // 16 + 2) + 8,
               max_num_seqs=max(bmax, 1), max_num_batched_tokens=max(512, bmax * prompt_len),
               prefill_chunk=max(prompt_len, 16), enable_prefix_caching=False)  # reps reuse the prompts: no hits
    engines = {"ours": _engine(path, **cfg, num_speculative_tokens=0)}
    if compare_prefill:
        engines["absorbed"] = _engine(path, **cfg, num_speculative_tokens=0, expanded_prefill=False)
        engines["loop"] = _engine(path, **cfg, num_speculative_tokens=0)
        engines["loop"].cache.group_prefill = False  # one SDPA call per prompt chunk instead of one per shape
    if compare_kernels:
        engines["torch"] = _engine(path, **cfg, num_speculative_tokens=0, cpu_kernels="off")
    if spec > 0:
        e = _engine(path, **cfg, num_speculative_tokens=spec)
        if e.num_spec:  # else the checkpoint has no MTP module
            engines["mtp"] = e
    eng = engines["ours"]
    bandwidth, expert_mb, other_mb = streaming_read(eng.model)
    peak = matmul_peak(n=1024, warmup=1)
    n_moe = sum(1 for m in eng.model.layers.modules() if isinstance(m, DispatchedMoE))
    g = torch.Generator().manual_seed(1)
    rows = []
    for B in batches:
        prompts = torch.randint(0, vocab, (B, prompt_len), generator=g)
        fns: dict[str, Callable[[], dict[str, Any]]] = {
            k: (lambda e=e: _timed_generate(e, prompts, new_tokens)) for k, e in engines.items()}
        fns["hf"] = lambda: _timed_hf(hf_model, prompts, new_tokens)
        # equality first (also the warm-up of every implementation); then the experts a decode step of B reads
        touched, first = touched_experts(eng.model, B, fns["ours"])
        outs = {k: first["ids"] if k == "ours" else fn()["ids"] for k, fn in fns.items()}
        for k, got in outs.items():
            if got != outs["hf"]:
                i = next(i for i, (x, y) in enumerate(zip(got, outs["hf"])) if x != y)
                raise AssertionError(f"{name} B={B}: greedy outputs differ ({k} row {i}: {got[i]} vs HF "
                                     f"{outs['hf'][i]})")
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in fns}
        rates = [bandwidth]  # the streaming rate, also after every timed generation: the floor's host state is theirs
        for _ in range(reps):  # interleaved: drifts of the shared machine hit all alike
            for k, fn in fns.items():
                runs[k].append(fn())
                rates.append(streaming_read(eng.model, reps=1)[0])
        med = {k: {"total_s": statistics.median(r["total_s"] for r in rs),
                   "prefill_s": statistics.median(r["prefill_s"] for r in rs),
                   "step_s": statistics.median([x for r in rs for x in r["steps_s"]]) if rs[0]["steps_s"] else None,
                   "decode_tok_s": sum(r["emitted"] for r in rs) / max(sum(sum(r["steps_s"]) for r in rs), 1e-12)}
               for k, rs in runs.items()}
        row = {"model": name, "batch": B, "prompt_len": prompt_len, "new_tokens": new_tokens,
               "ours_decode_tok_s": med["ours"]["decode_tok_s"], "hf_decode_tok_s": med["hf"]["decode_tok_s"],
               "ours_e2e_tok_s": B * new_tokens / med["ours"]["total_s"],
               "hf_e2e_tok_s": B * new_tokens / med["hf"]["total_s"],
               "ours_prefill_s": med["ours"]["prefill_s"], "hf_prefill_s": med["hf"]["prefill_s"],
               "outputs_equal": True, "times_s": med,
               "decode_steps_per_run": {k: statistics.median(len(r["steps_s"]) for r in rs) for k, rs in runs.items()},
               "ours_step_ms": 1e3 * (med["ours"]["step_s"] or 0.0), "hf_step_ms": 1e3 * (med["hf"]["step_s"] or 0.0),
               "touched_experts_per_layer": touched, "cache_mb_per_step": 1e-6 * latent_cache_bytes(
                   eng.model, B, prompt_len + new_tokens / 2),
               "stream_gb_s": statistics.median(rates) / 1e9,
               "stream_gb_s_range": (min(rates) / 1e9, max(rates) / 1e9)}
        row["read_mb_per_step"] = other_mb + n_moe * touched * expert_mb + row["cache_mb_per_step"]
        row["floor_step_ms"] = row["read_mb_per_step"] / row["stream_gb_s"]
        row["matmul_gflops"] = peak / 1e9
        row["step_gflop"] = decode_flops(eng.model, B, prompt_len + new_tokens / 2) / 1e9
        row["compute_floor_step_ms"] = 1e3 * row["step_gflop"] / row["matmul_gflops"]
        for k in fns:  # physics: no decode step reads its weights faster than the machine streams them
            st = med[k]["step_s"]
            if st is not None and 1e3 * st < row["floor_step_ms"]:
                raise AssertionError(f"{name} B={B}: {k}'s measured decode step ({1e3 * st:.2f} ms) is faster than "
                                     f"its bandwidth floor ({row['floor_step_ms']:.2f} ms): a measurement bug")
        row["ratio"] = row["ours_decode_tok_s"] / row["hf_decode_tok_s"]
        row["ratio_e2e"] = row["ours_e2e_tok_s"] / row["hf_e2e_tok_s"]
        row["ratio_prefill"] = row["hf_prefill_s"] / row["ours_prefill_s"]
        row["ours_step_over_floor"] = row["ours_step_ms"] / row["floor_step_ms"]
        row["bandwidth_bound_ratio"] = row["hf_step_ms"] / row["floor_step_ms"]
        row["ours_step_over_roofline"] = row["ours_step_ms"] / max(row["floor_step_ms"], row["compute_floor_step_ms"])
        if "torch" in med:  # the same engine with torch's GEMMs (before raymoe.model.cpu_kernels)
            row["torch_gemm_step_ms"] = 1e3 * (med["torch"]["step_s"] or 0.0)
        if "absorbed" in med:  # the same engine with prefill chunks through the absorbed path (before PrefillBatch)
            a = med["absorbed"]
            row.update(absorbed_prefill_s=a["prefill_s"], ratio_prefill_absorbed=row["hf_prefill_s"] / a["prefill_s"],
                       ratio_e2e_absorbed=med["hf"]["total_s"] / a["total_s"])
        if "loop" in med:  # the same engine with one SDPA call per prompt chunk (before PrefillGroup)
            row.update(loop_prefill_s=med["loop"]["prefill_s"],
                       prefill_grouped_speedup=med["loop"]["prefill_s"] / row["ours_prefill_s"])
        if "mtp" in med:
            d = runs["mtp"]
            verifies = sum(len(r["steps_s"]) for r in d) * B
            row.update(mtp_k=spec, ours_mtp_decode_tok_s=med["mtp"]["decode_tok_s"],
                       mtp_tokens_per_forward=sum(r["emitted"] for r in d) / verifies if verifies else 0.0)
            row["ratio_mtp"] = row["ours_mtp_decode_tok_s"] / row["hf_decode_tok_s"]
        rows.append(row)
    return rows


def prefill_attention_bench(name: str, shapes: list[tuple[int, int]], reps: int) -> list[dict[str, Any]]:
    """One MLA layer (``name`` preset, random weights) over a prefill step of ``B`` fresh prompts of ``L`` tokens
    (one chunk each): the expanded path with one SDPA call for the B same-shape chunks vs one call per chunk
    (``group_prefill``), the same view and inputs, outputs checked within 1e-5; minimum over ``reps`` interleaved
    rounds (the least disturbed run of each on a shared machine)."""
    from raymoe.config import ModelConfig
    from raymoe.engine.paged import PagedLatentCache
    from raymoe.model.mla import MLA
    from raymoe.model.rope import RotaryEmbedding

    cfg = ModelConfig.preset(name)
    torch.manual_seed(0)
    mla, rot = MLA(cfg, 0).eval(), RotaryEmbedding(cfg)
    rows = []
    for B, L in shapes:
        cache = PagedLatentCache(1, B * (L // 16 + 1), 16, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        tables: list[list[int]] = [[] for _ in range(B)]
        for bt in tables:
            cache.ensure(bt, L)
        segments = [(bt, 0, L) for bt in tables]
        x = torch.randn(1, B * L, cfg.hidden_size)
        times: dict[bool, list[float]] = {True: [], False: []}
        outs = {}
        with torch.no_grad():
            for _ in range(reps + 1):
                for grouped in (True, False):
                    cache.group_prefill = grouped
                    view = cache.prefill_batch(segments, short_max=1)
                    cos, sin = rot(view.positions(B * L, "cpu"))
                    t0 = time.perf_counter()
                    outs[grouped] = mla(x, cos, sin, view)
                    times[grouped].append(time.perf_counter() - t0)
        torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=1e-5)
        g, lp = min(times[True][1:]), min(times[False][1:])
        rows.append({"model": name, "batch": B, "prompt_len": L, "grouped_ms": 1e3 * g, "loop_ms": 1e3 * lp,
                     "loop_over_grouped": lp / g})
    return rows


# ---------------------------------------------------------------------------------------------- 2. MTP
def heldout_text(max_chars: int = 40_000) -> tuple[str, str]:
    """Text of the validation plays of the Shakespeare corpus (the training job's held-out split) → (text, source)."""
    try:
        from raymoe.data.build import DEFAULT_VAL_FRACTION
        from raymoe.data.corpus import corpus_source, split_documents

        src = corpus_source("shakespeare")
        _, val = split_documents(src.documents(), DEFAULT_VAL_FRACTION, salt=src.name)
        text = "\n\n".join(d.text for d in val)[:max_chars]
        return text, "shakespeare val: " + ", ".join(d.name for d in val)
    except (ModuleNotFoundError, FileNotFoundError) as e:  # corpus package missing: fall back, and say so
        from raymoe.engine.tiny import TINY_TEXT

        return TINY_TEXT, f"engine.tiny.TINY_TEXT (shakespeare corpus unavailable: {e})"


def _heldout_prompts(eng, n: int, prompt_len: int) -> list[list[int]]:
    text, _ = heldout_text()
    ids = eng.encode(text)
    V = eng.model_config.vocab_size
    ids = [t for t in ids if t < V]
    step = max(prompt_len, (len(ids) - prompt_len) // max(n, 1))
    return [ids[i : i + prompt_len] for i in range(0, step * n, step) if i + prompt_len <= len(ids)][:n]


def mtp_bench(name: str, path: pathlib.Path, ks: list[int], n_prompts: int, prompt_len: int, new_tokens: int
              ) -> list[dict[str, Any]]:
    from raymoe.engine import SamplingParams

    base = dict(block_size=16, num_blocks=n_prompts * ((prompt_len + new_tokens + max(ks + [0])) // 16 + 3) + 8,
                max_num_seqs=max(n_prompts, 1), max_num_batched_tokens=max(512, n_prompts * prompt_len),
                prefill_chunk=max(prompt_len, 16))
    ref_eng = _engine(path, **base, num_speculative_tokens=0)
    if ref_eng.tokenizer is None:
        raise SystemExit(f"{path}: MTP on held-out text needs the checkpoint's tokenizer.json")
    prompts = _heldout_prompts(ref_eng, n_prompts, prompt_len)
    sp = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    ref_eng.generate(prompts[:2], sp)  # warm-up
    t0 = time.perf_counter()
    ref = [o.outputs[0].token_ids for o in ref_eng.generate(prompts, sp)]
    t_ref = time.perf_counter() - t0
    rows = []
    for k in ks:
        eng = _engine(path, **base, num_speculative_tokens=k)
        if eng.num_spec == 0:
            rows.append({"model": name, "k": k, "note": "checkpoint has no MTP module"})
            continue
        eng.generate(prompts[:2], sp)
        s0 = dict(eng.stats)
        t0 = time.perf_counter()
        got = [o.outputs[0].token_ids for o in eng.generate(prompts, sp)]
        t = time.perf_counter() - t0
        d = {key: eng.stats[key] - s0[key] for key in eng.stats}
        if got != ref:
            first = next(i for i, (x, y) in enumerate(zip(got, ref)) if x != y)
            raise AssertionError(f"{name} k={k}: greedy outputs with MTP speculation differ from k=0 (prompt {first}: "
                                 f"{got[first]} vs {ref[first]})")
        rows.append({
            "model": name, "k": k, "prompts": len(prompts), "prompt_len": prompt_len, "new_tokens": new_tokens,
            "acceptance_rate": d["spec_accepted"] / d["spec_drafted"] if d["spec_drafted"] else 0.0,
            "tokens_per_target_forward": d["spec_emitted"] / d["spec_verifies"] if d["spec_verifies"] else 0.0,
            "engine_steps": d["steps"],
            "speedup_vs_no_spec": t_ref / t, "outputs_equal_no_spec": got == ref})
    return rows


# ---------------------------------------------------------------------------------------------- 4. prefix
def _prefix_trace(rng: "torch.Generator", V: int, kind: str, n: int, prefix_len: int, suffix: int,
                  groups: int) -> list[list[int]]:
    def toks(k: int) -> list[int]:
        return torch.randint(0, V, (k,), generator=rng).tolist()

    if kind == "distinct":
        return [toks(prefix_len + suffix) for _ in range(n)]
    heads = [toks(prefix_len) for _ in range(groups)]
    return [heads[i % groups] + toks(suffix) for i in range(n)]  # interleaved: g0, g1, ..., g0, g1, ...


def prefix_bench(name: str, path: pathlib.Path, n: int, conc: int, prefix_len: int, suffix: int, groups: int,
                 new_tokens: int, reps: int, spec: int = 0) -> list[dict[str, Any]]:
    """Prefix caching on vs off on the ``distinct`` and ``shared`` traces (see the module docstring)."""
    from raymoe.engine import SamplingParams

    per_seq = (prefix_len + suffix + new_tokens + spec) // 16 + 2
    cfg = dict(block_size=16, num_blocks=n * per_seq + 16, max_num_seqs=conc, max_num_batched_tokens=512,
               prefill_chunk=256, num_speculative_tokens=spec)
    engines = {"on": _engine(path, **cfg), "off": _engine(path, **cfg, enable_prefix_caching=False)}
    V = engines["on"].model_config.vocab_size
    sp = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    rng = torch.Generator().manual_seed(0)
    for eng in engines.values():  # warm-up
        eng.generate(_prefix_trace(rng, V, "distinct", 2, prefix_len, suffix, groups), sp)
    def closed_loop(eng, prompts: list[list[int]]) -> list[list[int]]:
        todo, done, inflight = list(enumerate(prompts)), {}, 0
        while todo or inflight:
            while todo and inflight < conc:
                i, p = todo.pop(0)
                eng.add_request(f"p{i}", p, sp)
                inflight += 1
            for o in eng.step():
                if o.finished:
                    done[int(o.request_id[1:])] = o.outputs[0].token_ids
                    inflight -= 1
        return [done[i] for i in range(len(prompts))]

    rows = []
    for kind in ("distinct", "shared"):
        times: dict[str, list[float]] = {"on": [], "off": []}
        hits = queries = 0
        equal = True
        for _ in range(reps):
            prompts = _prefix_trace(rng, V, kind, n, prefix_len, suffix, groups)
            outs = {}
            for key, eng in engines.items():
                h0, q0 = eng.scheduler.prefix_hits, eng.scheduler.prefix_queries
                t0 = time.perf_counter()
                outs[key] = closed_loop(eng, prompts)
                times[key].append(time.perf_counter() - t0)
                if key == "on":
                    hits += eng.scheduler.prefix_hits - h0
                    queries += eng.scheduler.prefix_queries - q0
            equal = equal and outs["on"] == outs["off"]
        if not equal:
            raise AssertionError(f"prefix bench {name}/{kind}: greedy outputs differ with prefix caching on and off")
        t_on, t_off = statistics.median(times["on"]), statistics.median(times["off"])
        rows.append({"model": name, "trace": kind, "requests": n, "concurrency": conc,
                     "prompt_len": prefix_len + suffix,
                     "shared_len": prefix_len if kind == "shared" else 0, "groups": groups if kind == "shared" else n,
                     "new_tokens": new_tokens, "hit_rate": hits / queries if queries else 0.0,
                     "on_s": t_on, "off_s": t_off, "on_req_s": n / t_on, "off_req_s": n / t_off,
                     "speedup": t_off / t_on, "outputs_equal": equal})
    return rows


# ---------------------------------------------------------------------------------------------- 3. load
def _summ(rec: list[dict[str, float]], wall: float, failed: int) -> dict[str, Any]:
    ttft = [r["ttft"] for r in rec]
    tpot = [r["tpot"] for r in rec if r["tpot"] is not None]
    toks = sum(r["ntok"] for r in rec)
    return {"ok": len(rec), "failed": failed, "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99),
            "tpot_p50": _pct(tpot, 50), "tpot_p99": _pct(tpot, 99), "tokens_per_s": toks / wall if wall > 0 else 0.0,
            "wall_s": wall}


def _inproc_level(eng, prompts: list[str], conc: int, max_tokens: int, timeout: float) -> dict[str, Any]:
    """Closed loop in-process: ``conc`` requests in flight, a new one added as soon as one finishes."""
    from raymoe.engine import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    todo = list(prompts)
    inflight, rec = 0, []
    t0 = time.perf_counter()
    while (todo or inflight) and time.perf_counter() - t0 < timeout:
        while todo and inflight < conc:
            eng.add_request(None, todo.pop(0), sp)
            inflight += 1
        for o in eng.step():
            if o.finished:
                inflight -= 1
                m, n = o.metrics, len(o.outputs[0].token_ids)
                rec.append({"ttft": m["first_token_time"] - m["arrival_time"], "ntok": n,
                            "tpot": (m["finish_time"] - m["first_token_time"]) / (n - 1) if n > 1 else None})
    for rid in list(eng.groups):
        eng.abort(rid)
    return _summ(rec, time.perf_counter() - t0, len(prompts) - len(rec))


async def _http_level(base_url: str, model: str, prompts: list[str], conc: int, max_tokens: int, timeout: float
                      ) -> dict[str, Any]:
    """Closed loop over HTTP with ``AsyncOpenAI``: ``conc`` workers, each sending streaming completions in turn."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0, timeout=timeout)
    todo = list(prompts)
    rec: list[dict[str, float]] = []
    errors: list[str] = []

    async def one(prompt: str) -> None:
        t0 = time.perf_counter()
        first = last = None
        ntok = 0
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].text:
                first = first or now
                last = now
            if getattr(chunk, "usage", None) is not None:
                ntok = chunk.usage.completion_tokens
        if first is None:
            raise RuntimeError("stream ended without text")
        rec.append({"ttft": first - t0, "ntok": ntok, "tpot": (last - first) / (ntok - 1) if ntok > 1 else None})

    async def worker() -> None:
        while todo:
            p = todo.pop(0)
            try:
                await one(p)
            except Exception as e:  # noqa: BLE001 - counted, reported
                errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(conc))), timeout)
    except asyncio.TimeoutError:
        errors.append(f"level timed out after {timeout:.0f} s")
    wall = time.perf_counter() - t0
    await client.close()
    out = _summ(rec, wall, len(prompts) - len(rec))
    out["errors"] = errors[:5]
    return out


def load_bench(path: pathlib.Path, concs: list[int], n_requests: int, max_tokens: int, timeout: float,
               engine_cfg: dict[str, Any], num_cpus: Optional[int] = None) -> dict[str, Any]:
    import ray
    from ray import serve

    from raymoe.jobs.serve import start_server

    probe = _engine(path, **engine_cfg)
    text, source = heldout_text(20_000)
    lines = [l.strip() for l in text.splitlines() if len(l.strip()) > 20]
    prompts = [lines[(i * 7) % len(lines)][:120] for i in range(max(n_requests, 1))]
    if probe.tokenizer is None:
        raise SystemExit(f"{path}: the load bench sends text prompts and needs tokenizer.json")
    own_ray = not ray.is_initialized()
    args = {"model_path": str(path), "served_model_name": "bench", "engine": dict(engine_cfg),
            "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 64},
            "engine_max_ongoing_requests": 256, "engine_max_queued_requests": 1024, "torch_threads": 1,
            "engine_num_cpus": 1}
    port = _free_port()
    t0 = time.perf_counter()
    url = start_server(args, "127.0.0.1", port, app_name="raymoe-bench", num_cpus=num_cpus or 4, timeout_s=240)
    startup = time.perf_counter() - t0
    levels = []
    try:
        asyncio.run(_http_level(url, "bench", prompts[:2], 1, max_tokens, timeout))  # warm-up
        n = torch.get_num_threads()
        torch.set_num_threads(1)  # the replica runs with torch_threads=1: same for the in-process engine
        try:
            _inproc_level(probe, prompts[:2], 1, max_tokens, timeout)  # warm-up
            for c in concs:
                ps = prompts[:n_requests]
                http = asyncio.run(_http_level(url, "bench", ps, c, max_tokens, timeout))
                inproc = _inproc_level(probe, ps, c, max_tokens, timeout)
                levels.append({"concurrency": c, "requests": len(ps), "serve": http, "inproc": inproc})
        finally:
            torch.set_num_threads(n)
    finally:
        try:
            serve.delete("raymoe-bench")
            serve.shutdown()
        finally:
            if own_ray:
                ray.shutdown()
    return {"prompts_from": source, "max_tokens": max_tokens, "engine": engine_cfg, "serve_startup_s": startup,
            "levels": levels}


# ---------------------------------------------------------------------------------------------- plot
def plot_latency(res: dict[str, Any], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = res["load"]["levels"]
    cs = [lv["concurrency"] for lv in levels]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric, label in ((axes[0], "ttft", "TTFT (ms)"), (axes[1], "tpot", "TPOT (ms)")):
        for path, style in (("serve", "-"), ("inproc", "--")):
            for q, marker in (("p50", "o"), ("p99", "^")):
                ys = [(lv[path][f"{metric}_{q}"] or 0) * 1e3 for lv in levels]
                ax.plot(cs, ys, style, marker=marker,
                        label=f"{'Serve (HTTP, openai)' if path == 'serve' else 'in-process engine'} {q}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams (closed loop)")
        ax.set_ylabel(label)
        ax.set_title(f"{label.split()[0]} vs offered load")
        ax.legend(fontsize=7)
    ax = axes[2]
    for path, style in (("serve", "-"), ("inproc", "--")):
        ax.plot(cs, [lv[path]["tokens_per_s"] for lv in levels], style, marker="o",
                label="Serve" if path == "serve" else "in-process")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("generated tokens/s")
    ax.set_title("throughput vs offered load")
    ax.legend(fontsize=7)
    fig.tight_layout()
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------- entry
def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1e3:,.1f}"


def run(args: dict[str, str]) -> dict:
    warnings.filterwarnings("ignore")
    parts = set(args.get("parts", "decode,mtp,load").split(","))
    batches = _ints(args.get("batches", "1,16"))
    prompt_len, new_tokens = int(args.get("prompt_len", 32)), int(args.get("new_tokens", 32))
    reps = int(args.get("reps", 3))
    # one intra-op thread by default: on a small shared machine more threads mostly spin against each other
    # (measured here: 2 threads on 2 busy cores ran the tiny model ~40x slower than 1 thread)
    torch.set_num_threads(int(args.get("threads", 1)))
    res: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="raymoe-bench-serve-") as tmp:
        root = pathlib.Path(tmp)
        if "decode" in parts:
            rows = []
            for name, path in _checkpoints(args, root).items():
                rows += decode_bench(name, path, batches, prompt_len, new_tokens, reps, int(args.get("decode_spec", 1)),
                                     args.get("compare_prefill", "1") not in ("0", "false"),
                                     args.get("compare_kernels", "1") not in ("0", "false"))
            res["decode"] = rows
            t = Table(title=f"greedy decode, prompt {prompt_len} + {new_tokens} new tokens, "
                            f"{torch.get_num_threads()} threads")
            for c in ("model", "batch", "decode ours tok/s", "HF tok/s", "ours/HF", "prefill ours/HF (absorbed)",
                      "e2e ours/HF (absorbed)", "MTP tok/fwd", "ours+MTP/HF", "step ms ours (torch GEMMs)/HF",
                      "floor ms bw/compute", "ours/floor", "ours/max floor", "HF/floor", "prefill loop/grouped",
                      "equal"):
                t.add_column(c, justify="right")
            for r in rows:
                t.add_row(r["model"], str(r["batch"]), f"{r['ours_decode_tok_s']:,.0f}", f"{r['hf_decode_tok_s']:,.0f}",
                          f"{r['ratio']:.2f}x",
                          f"{r['ratio_prefill']:.2f}x ({r['ratio_prefill_absorbed']:.2f}x)"
                          if "ratio_prefill_absorbed" in r else f"{r['ratio_prefill']:.2f}x",
                          f"{r['ratio_e2e']:.2f}x ({r['ratio_e2e_absorbed']:.2f}x)"
                          if "ratio_e2e_absorbed" in r else f"{r['ratio_e2e']:.2f}x",
                          f"{r['mtp_tokens_per_forward']:.2f}" if "ratio_mtp" in r else "-",
                          f"{r['ratio_mtp']:.2f}x" if "ratio_mtp" in r else "-",
                          f"{r['ours_step_ms']:.1f}"
                          + (f" ({r['torch_gemm_step_ms']:.1f})" if "torch_gemm_step_ms" in r else "")
                          + f"/{r['hf_step_ms']:.1f}",
                          f"{r['floor_step_ms']:.1f}/{r['compute_floor_step_ms']:.1f}",
                          f"{r['ours_step_over_floor']:.1f}x", f"{r['ours_step_over_roofline']:.1f}x",
                          f"{r['bandwidth_bound_ratio']:.1f}x",
                          f"{r['prefill_grouped_speedup']:.2f}x" if "prefill_grouped_speedup" in r else "-",
                          str(r["outputs_equal"]))
            console.print(t)
        if "prefill_attn" in parts:
            shapes = [(int(b), int(n)) for b, n in (x.split("x") for x in
                                                    args.get("prefill_shapes", "16x256,64x32,64x16").split(","))]
            rows = []
            for name in [m for m in args.get("model", "tiny,small").split(",") if m]:
                rows += prefill_attention_bench(name, shapes, reps)
            res["prefill_attn"] = rows
            t = Table(title=f"prefill attention (one MLA layer), grouped vs one call per chunk, min of {reps}")
            for c in ("model", "prompts x tokens", "grouped ms", "per-chunk ms", "per-chunk/grouped"):
                t.add_column(c, justify="right")
            for r in rows:
                t.add_row(r["model"], f"{r['batch']}x{r['prompt_len']}", f"{r['grouped_ms']:.2f}",
                          f"{r['loop_ms']:.2f}", f"{r['loop_over_grouped']:.2f}x")
            console.print(t)
        if "prefix" in parts:
            rows = []
            for name, path in _checkpoints(args, root).items():
                rows += prefix_bench(name, path, int(args.get("prefix_requests", 32)), int(args.get("prefix_conc", 8)),
                                     int(args.get("prefix_len", 192)), int(args.get("prefix_suffix", 32)),
                                     int(args.get("prefix_groups", 4)), int(args.get("prefix_new_tokens", 16)), reps,
                                     int(args.get("prefix_spec", 0)))
            res["prefix"] = rows
            t = Table(title="prefix caching on vs off (same engine, same prompts; closed loop, greedy)")
            for c in ("model", "trace", "requests/conc", "prompt (shared)", "hit rate", "on s", "off s", "on req/s",
                      "off req/s", "on/off speed", "equal"):
                t.add_column(c, justify="right")
            for r in rows:
                t.add_row(r["model"], r["trace"], f"{r['requests']}/{r['concurrency']}",
                          f"{r['prompt_len']} ({r['shared_len']})",
                          f"{r['hit_rate']:.1%}", f"{r['on_s']:.2f}", f"{r['off_s']:.2f}", f"{r['on_req_s']:.2f}",
                          f"{r['off_req_s']:.2f}", f"{r['speedup']:.3f}x", str(r["outputs_equal"]))
            console.print(t)
        mtp_path: Optional[pathlib.Path] = None
        if "mtp" in parts or "load" in parts:
            mtp_path = pathlib.Path(args["hf"]).resolve() if args.get("hf") else \
                tiny_checkpoint(root, int(args.get("tiny_steps", 30)))
        mtp_name = f"hf:{mtp_path.name}" if args.get("hf") and mtp_path else "tiny (engine.tiny, trained)"
        if "mtp" in parts:
            ks = _ints(args.get("spec", "1,2"))
            rows = mtp_bench(mtp_name, mtp_path, ks, int(args.get("mtp_prompts", 16)),
                             int(args.get("mtp_prompt_len", 32)), int(args.get("mtp_new_tokens", 32)))
            res["mtp"] = {"text": heldout_text(1)[1], "rows": rows}
            t = Table(title=f"MTP speculation on held-out text ({res['mtp']['text'][:60]}), greedy")
            for c in ("model", "k", "acceptance", "tokens / target fwd", "speedup vs k=0", "equal k=0"):
                t.add_column(c, justify="right")
            for r in rows:
                if "note" in r:
                    t.add_row(r["model"], str(r["k"]), r["note"], "", "", "")
                else:
                    t.add_row(r["model"], str(r["k"]), f"{r['acceptance_rate']:.1%}",
                              f"{r['tokens_per_target_forward']:.2f}", f"{r['speedup_vs_no_spec']:.2f}x",
                              str(r["outputs_equal_no_spec"]))
            console.print(t)
        if "load" in parts:
            ecfg = dict(block_size=16, num_blocks=int(args.get("num_blocks", 1024)), max_num_seqs=64,
                        max_num_batched_tokens=512, prefill_chunk=256,
                        num_speculative_tokens=int(args.get("load_spec", 1)), max_waiting=1024)
            lres = load_bench(mtp_path, _ints(args.get("conc", "1,4,16")), int(args.get("load_requests", 32)),
                              int(args.get("load_tokens", 32)), float(args.get("load_timeout", 120)), ecfg,
                              int(args["ray_cpus"]) if args.get("ray_cpus") else None)
            lres["model"] = mtp_name
            for lv in lres["levels"]:
                s, i = lv["serve"], lv["inproc"]
                lv["hop_ttft_p50_ms"] = ((s["ttft_p50"] or 0) - (i["ttft_p50"] or 0)) * 1e3
                lv["hop_tpot_p50_ratio"] = (s["tpot_p50"] / i["tpot_p50"]) if s["tpot_p50"] and i["tpot_p50"] else None
                lv["hop_throughput_ratio"] = (s["tokens_per_s"] / i["tokens_per_s"]) if i["tokens_per_s"] else None
            res["load"] = lres
            t = Table(title=f"under load: {mtp_name}, {lres['max_tokens']} tokens/request, closed loop "
                            f"(Serve via AsyncOpenAI vs in-process engine; ms)")
            for c in ("conc", "path", "ok/fail", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "tok/s"):
                t.add_column(c, justify="right")
            for lv in lres["levels"]:
                for pth in ("serve", "inproc"):
                    x = lv[pth]
                    t.add_row(str(lv["concurrency"]), pth, f"{x['ok']}/{x['failed']}", _ms(x["ttft_p50"]),
                              _ms(x["ttft_p99"]), _ms(x["tpot_p50"]), _ms(x["tpot_p99"]), f"{x['tokens_per_s']:,.0f}")
            console.print(t)
            h = Table(title="cost of the Serve hop (Serve − in-process, same prompts and engine config)")
            for c in ("conc", "Δ TTFT p50 (ms)", "TPOT p50 Serve/in-proc", "tok/s Serve/in-proc"):
                h.add_column(c, justify="right")
            for lv in lres["levels"]:
                h.add_row(str(lv["concurrency"]), f"{lv['hop_ttft_p50_ms']:+,.1f}",
                          f"{lv['hop_tpot_p50_ratio']:.2f}x" if lv["hop_tpot_p50_ratio"] else "-",
                          f"{lv['hop_throughput_ratio']:.2f}x" if lv["hop_throughput_ratio"] else "-")
            console.print(h)
            plot = args.get("plot", "bench_results/serve_latency.png")
            if plot and plot != "none":
                res["plot"] = plot_latency(res, plot)
                print(f"plot: {res['plot']}")
        if "load_rates" in parts:
            from raymoe.jobs.benches.serve_load import load_rates_part

            res["load_rates"] = load_rates_part(args, root, console)
    return res
