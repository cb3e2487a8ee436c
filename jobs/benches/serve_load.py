"""`python -m raymoe.jobs.bench serve parts=load_rates`: the Serve app under open-loop load, prefix caching on / off.

The closed loop of ``parts=load`` (a fixed number of streams, each sending its next request when the last one ended)
can never offer more than the server absorbs, so it hides queueing. Here requests arrive on their own clock:
**Poisson arrivals** at each offered rate of ``rates=2,4,8,16,32`` (requests/s; exponential gaps from a seeded
generator), ``rates_requests`` requests per rate, each a streaming completion from the real ``openai`` client
(``AsyncOpenAI``, ``stream_options.include_usage``, greedy, ``ignore_eos``, ``rates_tokens`` new tokens) against
the real Ray Serve app (:func:`raymoe.jobs.serve.start_server` on 127.0.0.1).

Two traces of random token ids (the prompt is sent as ids), ``rates_traces=shared,random``:

* **shared** — :func:`raymoe.jobs.benches.serve._prefix_trace`: ``rates_groups`` groups whose requests share a
  ``rates_prefix``-token prefix and differ in ``rates_suffix`` tokens, interleaved across groups;
* **random** — every prompt ``rates_prefix + rates_suffix`` fresh tokens (nothing to reuse).

Each (trace, rate) gets fresh prompts drawn from a generator seeded by its position and arrival times seeded by the
rate, so the cache on and cache off runs see exactly the same requests at the same offsets (and both traces the same
arrival pattern), and no level reuses an earlier level's prefixes. Prefix caching is the engine's
``engine.enable_prefix_caching``: the app is deployed once per setting (``rates_cache=on,off``; route prefixes
``/on`` and ``/off`` on one Serve proxy, one engine replica each), both for the whole run, and each (trace, rate)
runs against one setting, then at once the other, in alternating order (``run_order`` in the JSON), so drifts of a
shared machine hit both alike.

Arguments (defaults): ``rates=2,4,8,16,32``, ``rates_requests=32``, ``rates_tokens=16``, ``rates_prefix=192``,
``rates_suffix=32``, ``rates_groups=4``, ``rates_traces=shared,random``, ``rates_cache=on,off``,
``rates_timeout=120`` (s after a level's last arrival; unfinished requests then count as failed),
``rates_warmup=8`` (unreported requests sharing one prefix, sent to each app before anything is measured: one alone,
then a burst of the rest),
``rates_plot=bench_results/serve_load_rates.png`` (``none``: no plot); shared with the other parts: ``hf=<export>``
instead of the trained tiny checkpoint (``tiny_steps``), ``load_spec=1`` MTP drafts per step, ``num_blocks=1024``,
``ray_cpus``. The engine is otherwise ``parts=load``'s (blocks of 16, 64 sequences, 512 tokens per step).

Per (trace, cache, rate): offered req/s (nominal, and measured from the actual send times), achieved req/s
(completed / time from the first send to the last completion), output tokens/s over the same window, TTFT p50/p99
(send → first streamed chunk with text), TPOT p50/p99 (per request: first → last text chunk over ``tokens − 1``),
failed requests, and the prefix-cache **hit rate** = Σ ``usage.prompt_tokens_details.cached_tokens`` / Σ
``usage.prompt_tokens``. Percentiles are nearest-rank (with 32 requests, p99 is the slowest request).

The bench raises when something it reports is inconsistent:

* any request failed at the lowest rate (the server is not overloaded there);
* a completed request did not stream exactly ``rates_tokens`` tokens (EOS is ignored);
* greedy text differs between cache on and cache off for the same request;
* ``cached_tokens`` is not a multiple of the block size, is more than the ``block_size · ⌊(L − 1) / block_size⌋``
  a prompt of L tokens can reuse, or is non-zero with the cache off or on the random trace;
* the shared trace with the cache on had no hit at all;
* the engine's own counters (``prefix_cache_hits`` / ``prefix_cache_queries`` of the replica's ``metrics()``,
  read before and after each level; counted only with the cache on) disagree with the sums of ``usage`` over
  that level.
"""
from __future__ import annotations

import asyncio
import pathlib
import time
from typing import Any, Optional

import torch
from rich.table import Table

__all__ = ["run", "load_rates_part", "load_rates_bench", "poisson_arrivals", "plot_load_rates"]

APP = "raymoe-bench-rates"
MODEL = "bench"


def poisson_arrivals(rate: float, n: int, rng: torch.Generator) -> list[float]:
    """``n`` arrival offsets (s) of a Poisson process of ``rate`` per second, the first at 0: i.i.d. exponential
    gaps of mean ``1 / rate`` (inverse CDF of uniforms drawn from ``rng``)."""
    if rate <= 0:
        raise ValueError(f"rates must be > 0 requests/s, got {rate}")
    u = torch.rand(max(n - 1, 0), generator=rng, dtype=torch.float64)
    gaps = (-torch.log1p(-u) / rate).tolist()
    out, t = [0.0], 0.0
    for g in gaps:
        t += g
        out.append(t)
    return out[:n]


async def _open_loop(base_url: str, prompts: list[list[int]], arrivals: list[float], max_tokens: int,
                     timeout: float) -> tuple[list[dict[str, Any]], float]:
    """Send ``prompts[i]`` at ``arrivals[i]`` s after the start, whatever is still in flight (open loop); one record
    per request: send / first / last chunk times (perf_counter), tokens, usage, text, or the error."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0, timeout=timeout)
    recs: list[dict[str, Any]] = [{"i": i, "ok": False, "error": "not sent"} for i in range(len(prompts))]

    async def one(i: int, t_at: float) -> None:
        await asyncio.sleep(max(0.0, t_at - time.perf_counter()))
        r = recs[i]
        r.update(send=time.perf_counter(), error=None)
        first = last = None
        text, usage = [], None
        try:
            stream = await client.completions.create(
                model=MODEL, prompt=prompts[i], max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True, "skip_special_tokens": False})  # every token decodes to text
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.choices and chunk.choices[0].text:
                    first = first or now
                    last = now
                    text.append(chunk.choices[0].text)
                if getattr(chunk, "usage", None) is not None:
                    usage = chunk.usage
            if first is None or usage is None:
                raise RuntimeError("stream ended without text or without usage")
            details = usage.prompt_tokens_details
            r.update(ok=True, first=first, last=last, ntok=usage.completion_tokens,
                     prompt_tokens=usage.prompt_tokens, cached=int(details.cached_tokens or 0) if details else 0,
                     text="".join(text))
        except Exception as e:  # noqa: BLE001 - counted and reported per level
            r.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
        finally:
            r["end"] = time.perf_counter()

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(one(i, t0 + a)) for i, a in enumerate(arrivals)]
    done, pending = await asyncio.wait(tasks, timeout=arrivals[-1] + timeout if arrivals else timeout)
    for t in pending:  # past the level's deadline: cancelled, counted as failed
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
        for r in recs:
            if not r["ok"] and r["error"] in (None, "not sent"):
                r["error"] = f"not finished {timeout:.0f} s after the last arrival"
    await client.close()
    return recs, t0


def _summary(recs: list[dict[str, Any]], rate: float, max_tokens: int) -> dict[str, Any]:
    from raymoe.jobs.benches.serve import _pct

    ok = [r for r in recs if r["ok"]]
    sends = sorted(r["send"] for r in recs if "send" in r)
    ttft = [r["first"] - r["send"] for r in ok]
    tpot = [(r["last"] - r["first"]) / (r["ntok"] - 1) for r in ok if r["ntok"] > 1]
    window = (max(r["end"] for r in ok) - sends[0]) if ok else 0.0
    prompt_toks, cached = sum(r["prompt_tokens"] for r in ok), sum(r["cached"] for r in ok)
    return {
        "offered_req_s": rate,
        "sent_req_s": (len(sends) - 1) / (sends[-1] - sends[0]) if len(sends) > 1 and sends[-1] > sends[0] else None,
        "requests": len(recs), "ok": len(ok), "failed": len(recs) - len(ok),
        "achieved_req_s": len(ok) / window if window > 0 else 0.0,
        "output_tokens": sum(r["ntok"] for r in ok), "window_s": window,
        "output_tokens_per_s": sum(r["ntok"] for r in ok) / window if window > 0 else 0.0,
        "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99), "tpot_p50": _pct(tpot, 50), "tpot_p99": _pct(tpot, 99),
        "prompt_tokens": prompt_toks, "cached_tokens": cached,
        "hit_rate": cached / prompt_toks if prompt_toks else 0.0,
        "max_tokens": max_tokens, "errors": sorted({r["error"] for r in recs if r["error"]})[:5],
    }


def _engine_counters(app_name: str) -> dict[str, int]:
    from ray import serve

    m = serve.get_deployment_handle("EngineDeployment", app_name=app_name).info.remote().result()["metrics"]
    return {"hits": int(m["prefix_cache_hits"]), "queries": int(m["prefix_cache_queries"])}


def load_rates_bench(path: pathlib.Path, rates: list[float], n_requests: int, max_tokens: int,
                     traces: list[str], prefix_len: int, suffix: int, groups: int, timeout: float,
                     engine_cfg: dict[str, Any], caches: list[str], num_cpus: Optional[int] = None,
                     seed: int = 0, n_warm: int = 8) -> dict[str, Any]:
    """Every (cache setting, trace, rate) level against a freshly deployed app per cache setting; returns the rows
    and the run's parameters, after the consistency checks of the module docstring (raises on a violation)."""
    import ray

    from raymoe.engine import EngineConfig
    from raymoe.jobs.benches.serve import _free_port, _prefix_trace
    from raymoe.jobs.serve import start_server, stop_server

    for t in traces:
        if t not in ("shared", "random"):
            raise SystemExit(f"rates_traces: unknown trace {t!r}; allowed: shared, random")
    for c in caches:
        if c not in ("on", "off"):
            raise SystemExit(f"rates_cache: unknown setting {c!r}; allowed: on, off")
    if not rates:
        raise SystemExit("rates: give at least one offered rate (requests/s), e.g. rates=1,2,4")
    rates = sorted(rates)
    if not (path / "tokenizer.json").exists():
        raise SystemExit(f"{path}: the load bench streams text and needs the checkpoint's tokenizer.json")
    import json

    V = int(json.loads((path / "config.json").read_text())["vocab_size"])
    bs = EngineConfig(**engine_cfg).block_size
    # the requests of every level, fixed before any server runs: identical for cache on and off
    # (arrival times depend on the rate only, so the traces also meet the same arrival pattern at each rate)
    plan: dict[tuple[str, float], tuple[list[list[int]], list[float]]] = {}
    for ri, rate in enumerate(rates):
        arrivals = poisson_arrivals(rate, n_requests, torch.Generator().manual_seed(seed * 1_000_003 + ri))
        for ti, trace in enumerate(traces):
            rng = torch.Generator().manual_seed(seed * 1_000_003 + 1000 * (ti + 1) + ri)
            prompts = _prefix_trace(rng, V, "shared" if trace == "shared" else "distinct", n_requests, prefix_len,
                                    suffix, groups)
            plan[(trace, rate)] = (prompts, arrivals)
    n_warm = max(n_warm, 2)
    # one shared prefix: the first request misses, the burst after it hits (with the cache on), so both prefill
    # paths (with and without a cached prefix before the chunk) have run once before anything is measured
    warm = _prefix_trace(torch.Generator().manual_seed(seed + 999_983), V, "shared", n_warm, prefix_len, suffix, 1)

    own_ray = not ray.is_initialized()
    port = _free_port()
    rows: list[dict[str, Any]] = []
    texts: dict[tuple[str, str, float], list[Optional[str]]] = {}
    startup: dict[str, float] = {}
    urls: dict[str, str] = {}
    try:
        # one app per cache setting, both deployed for the whole run (an idle replica's loop only waits), so each
        # (trace, rate) runs with the cache on and off back to back, in alternating order: the drift of a shared
        # machine hits both alike
        for cache in caches:
            cfg = dict(engine_cfg, enable_prefix_caching=cache == "on")
            args = {"model_path": str(path), "served_model_name": MODEL, "engine": cfg,
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 64},
                    "engine_max_ongoing_requests": 256, "engine_max_queued_requests": 1024, "torch_threads": 1,
                    "engine_num_cpus": 1}
            t0 = time.perf_counter()
            urls[cache] = start_server(args, "127.0.0.1", port, app_name=f"{APP}-{cache}", route_prefix=f"/{cache}",
                                       num_cpus=num_cpus or 4, timeout_s=240)
            startup[cache] = time.perf_counter() - t0
        for cache in caches:  # warm-up, not reported: one request alone, then a burst (a fresh replica's first batches)
            asyncio.run(_open_loop(urls[cache], warm[:1], [0.0], max_tokens, timeout))
            asyncio.run(_open_loop(urls[cache], warm[1:], [0.02 * i for i in range(n_warm - 1)], max_tokens, timeout))
        k = 0
        for trace in traces:
            for rate in rates:
                prompts, arrivals = plan[(trace, rate)]
                for cache in (caches if k % 2 == 0 else caches[::-1]):
                    app = f"{APP}-{cache}"
                    c0 = _engine_counters(app)
                    recs, _ = asyncio.run(_open_loop(urls[cache], prompts, arrivals, max_tokens, timeout))
                    c1 = _engine_counters(app)
                    row = {"trace": trace, "cache": cache, **_summary(recs, rate, max_tokens), "run_order": k,
                           "engine_hits": c1["hits"] - c0["hits"], "engine_queries": c1["queries"] - c0["queries"]}
                    row["engine_hit_rate"] = row["engine_hits"] / row["engine_queries"] if row["engine_queries"] \
                        else 0.0
                    _check_level(row, recs, prompts, bs, rate == rates[0])
                    rows.append(row)
                    texts[(trace, cache, rate)] = [r.get("text") if r["ok"] else None for r in recs]
                    k += 1
    finally:
        for cache in urls:
            stop_server(f"{APP}-{cache}", shutdown=False)
        # Serve's proxy holds this port: stop it, so a later start in the same Ray binds its own
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
        if own_ray:
            ray.shutdown()
    rows.sort(key=lambda r: (caches.index(r["cache"]), traces.index(r["trace"]), r["offered_req_s"]))
    _check_across(rows, texts, traces, rates, caches)
    return {"rows": rows, "rates": rates, "requests_per_rate": n_requests, "max_tokens": max_tokens,
            "traces": traces, "prefix_len": prefix_len, "suffix_len": suffix, "groups": groups, "engine": engine_cfg,
            "serve_startup_s": startup}


def _check_level(row: dict[str, Any], recs: list[dict[str, Any]], prompts: list[list[int]], bs: int,
                 lowest: bool) -> None:
    where = f"load_rates {row['trace']}/cache {row['cache']}/{row['offered_req_s']:g} req/s"
    if lowest and row["failed"]:
        raise AssertionError(f"{where}: {row['failed']} of {row['requests']} requests failed at the lowest rate: "
                             f"{row['errors']}")
    for r in recs:
        if not r["ok"]:
            continue
        L = len(prompts[r["i"]])
        if r["ntok"] != row["max_tokens"]:
            raise AssertionError(f"{where}: request {r['i']} streamed {r['ntok']} tokens, not max_tokens="
                                 f"{row['max_tokens']} (EOS is ignored)")
        if r["prompt_tokens"] != L:
            raise AssertionError(f"{where}: request {r['i']} reports {r['prompt_tokens']} prompt tokens, sent {L}")
        c = r["cached"]
        if c % bs or c > bs * ((L - 1) // bs) or (c and (row["cache"] == "off" or row["trace"] == "random")):
            raise AssertionError(f"{where}: request {r['i']} reports cached_tokens={c} (prompt {L}, block {bs}): "
                                 f"impossible with the cache {row['cache']} on the {row['trace']} trace")
    # the engine counts its prefix-cache queries only with the cache on (0 / 0 with it off)
    expect = (row["cached_tokens"], row["prompt_tokens"]) if row["cache"] == "on" else (0, 0)
    if not row["failed"] and (row["engine_hits"], row["engine_queries"]) != expect:
        raise AssertionError(f"{where}: the engine counted {row['engine_hits']} reused of {row['engine_queries']} "
                             f"prompt tokens, expected {expect[0]} of {expect[1]} from the responses' usage")


def _check_across(rows: list[dict[str, Any]], texts: dict, traces: list[str], rates: list[float],
                  caches: list[str]) -> None:
    for trace in traces:
        for rate in rates:
            if "on" in caches and "off" in caches:
                on, off = texts[(trace, "on", rate)], texts[(trace, "off", rate)]
                for i, (a, b) in enumerate(zip(on, off)):
                    if a is not None and b is not None and a != b:
                        raise AssertionError(f"load_rates {trace}/{rate:g} req/s request {i}: greedy text differs "
                                             f"with prefix caching on ({a!r}) and off ({b!r})")
    shared_on = [r for r in rows if r["trace"] == "shared" and r["cache"] == "on"]
    if shared_on and sum(r["cached_tokens"] for r in shared_on) == 0:
        raise AssertionError("load_rates: the shared-prefix trace with prefix caching on reused no prompt token")


# ---------------------------------------------------------------------------------------------- plot
def plot_load_rates(res: dict[str, Any], out: str) -> str:
    """TTFT and TPOT (p50 solid, p99 dashed) and output tokens/s vs offered rate, one colour per trace × cache."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - ScalarFormatter below

    rows = res["rows"]
    series = sorted({(r["trace"], r["cache"]) for r in rows})
    colors = dict(zip(series, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for key in series:
        rs = sorted((r for r in rows if (r["trace"], r["cache"]) == key), key=lambda r: r["offered_req_s"])
        xs = [r["offered_req_s"] for r in rs]
        name = f"{key[0]}, cache {key[1]}"
        for ax, metric in ((axes[0], "ttft"), (axes[1], "tpot")):
            for q, style in (("p50", "-"), ("p99", "--")):
                ys = [r[f"{metric}_{q}"] * 1e3 if r[f"{metric}_{q}"] is not None else float("nan") for r in rs]
                ax.plot(xs, ys, style, marker="o", color=colors[key], label=f"{name} {q}")
        axes[2].plot(xs, [r["output_tokens_per_s"] for r in rs], "-", marker="o", color=colors[key], label=name)
    for ax, ylabel, title in ((axes[0], "TTFT (ms)", "time to first token"),
                              (axes[1], "TPOT (ms)", "time per output token"),
                              (axes[2], "output tokens/s", "throughput")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("offered requests/s (Poisson)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} vs offered rate")
        ax.legend(fontsize=7)
    for ax in axes:
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    fig.tight_layout()
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------- entry
def load_rates_part(args: dict[str, str], root: pathlib.Path, console) -> dict[str, Any]:
    """``parts=load_rates`` of the serve bench: run, print the table, plot; returns the JSON section."""
    from raymoe.jobs.benches.serve import _ms, tiny_checkpoint

    if args.get("hf"):
        path, name = pathlib.Path(args["hf"]).resolve(), f"hf:{pathlib.Path(args['hf']).resolve().name}"
    else:
        path, name = tiny_checkpoint(root, int(args.get("tiny_steps", 30))), "tiny (engine.tiny, trained)"
    ecfg = dict(block_size=16, num_blocks=int(args.get("num_blocks", 1024)), max_num_seqs=64,
                max_num_batched_tokens=512, prefill_chunk=256,
                num_speculative_tokens=int(args.get("load_spec", 1)), max_waiting=1024)
    res = load_rates_bench(
        path, [float(x) for x in str(args.get("rates", "2,4,8,16,32")).split(",") if x.strip()],
        int(args.get("rates_requests", 32)), int(args.get("rates_tokens", 16)),
        [t for t in str(args.get("rates_traces", "shared,random")).split(",") if t],
        int(args.get("rates_prefix", 192)), int(args.get("rates_suffix", 32)), int(args.get("rates_groups", 4)),
        float(args.get("rates_timeout", 120)), ecfg,
        [c for c in str(args.get("rates_cache", "on,off")).split(",") if c],
        int(args["ray_cpus"]) if args.get("ray_cpus") else None, n_warm=int(args.get("rates_warmup", 8)))
    res["model"] = name
    t = Table(title=f"open loop (Poisson arrivals): {name}, {res['requests_per_rate']} requests per rate, prompts "
                    f"{res['prefix_len'] + res['suffix_len']} ids (shared: {res['prefix_len']} in "
                    f"{res['groups']} groups), {res['max_tokens']} tokens each, greedy; ms")
    for c in ("trace", "cache", "offered req/s", "sent req/s", "achieved req/s", "ok/fail", "out tok/s",
              "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "hit rate"):
        t.add_column(c, justify="right")
    for r in res["rows"]:
        t.add_row(r["trace"], r["cache"], f"{r['offered_req_s']:g}",
                  f"{r['sent_req_s']:.2f}" if r["sent_req_s"] else "-", f"{r['achieved_req_s']:.2f}",
                  f"{r['ok']}/{r['failed']}", f"{r['output_tokens_per_s']:,.0f}", _ms(r["ttft_p50"]),
                  _ms(r["ttft_p99"]), _ms(r["tpot_p50"]), _ms(r["tpot_p99"]), f"{r['hit_rate']:.1%}")
    console.print(t)
    plot = args.get("rates_plot", "bench_results/serve_load_rates.png")
    if plot and plot != "none":
        res["plot"] = plot_load_rates(res, plot)
        print(f"plot: {res['plot']}")
    return res


def run(args: dict[str, str]) -> dict:
    """``python -m raymoe.jobs.bench serve_load ...`` = ``python -m raymoe.jobs.bench serve parts=load_rates ...``."""
    from raymoe.jobs.benches import serve

    return serve.run({**args, "parts": "load_rates"})
