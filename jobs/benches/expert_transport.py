"""`python -m raymoe.jobs.bench expert_transport`: the data plane between an engine and remote expert shards.

One MoE layer's dispatch to ``shards=`` 2 remote shards, each holding ``slots=`` 4 expert slots of width
``dim=`` 512 / ``inter=`` 256, for ``rows=`` 8,64,512 rows per shard (decode-sized to prefill-sized), measured three
ways in one run (median of ``reps=`` 30 after 5 warm-ups, ms per layer):

* ``in-process``: the same grouped GEMMs in this process, one shard after the other (no transport at all);
* ``gloo``: :class:`raymoe.engine.remote.RemoteShard` → :class:`raymoe.engine.remote.ShardServer` in separate
  processes (``python -m raymoe.engine.remote``): post every shard's rows, then wait for every output — what
  ``experts.backend=remote`` does;
* ``ray``: a Ray actor per shard holding the same experts, ``ray.get([a.run.remote(x, counts) ...])`` — the
  "obvious" Ray data plane, one actor call per shard per layer.

The ratio ``ray / gloo`` is why the data plane is gloo pairs. ``threads=1`` torch threads everywhere.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from raymoe.jobs.benches import median_seconds
from raymoe.model.moe import RoutedExperts


def _median_ms(fn: Callable[[], Any], reps: int) -> float:
    return 1e3 * median_seconds(fn, reps, warmup=5)


def run(args: dict[str, str]) -> dict:
    import ray

    shards, slots = int(args.get("shards", "2")), int(args.get("slots", "4"))
    dim, inter = int(args.get("dim", "512")), int(args.get("inter", "256"))
    rows_list = [int(r) for r in args.get("rows", "8,64,512").split(",")]
    reps, threads = int(args.get("reps", "30")), int(args.get("threads", "1"))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    experts = [RoutedExperts(slots, dim, inter).requires_grad_(False) for _ in range(shards)]
    for ex in experts:
        for p in ex.parameters():
            torch.nn.init.normal_(p, std=0.05)

    from raymoe.engine.remote import RemoteShard, spawn_shard_processes

    procs: list = []
    started_ray = False
    try:
        remote = []
        for i, (addr, ex) in enumerate(zip(spawn_shard_processes(shards, procs, threads), experts)):
            r = RemoteShard(addr, f"bench{i}")
            r.load("layer", ex, list(range(slots)))
            remote.append(r)
        if not ray.is_initialized():
            ray.init(num_cpus=max(shards, 2), include_dashboard=False, log_to_driver=False)
            started_ray = True

        @ray.remote(num_cpus=0)
        class RayShard:
            def __init__(self, ex: RoutedExperts, n_threads: int) -> None:
                torch.set_num_threads(n_threads)
                self.ex = ex

            def run(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
                with torch.inference_mode():
                    return self.ex.forward_grouped(x, counts)

        actors = [RayShard.remote(ex, threads) for ex in experts]
        ray.get([a.run.remote(torch.zeros(1, dim), torch.tensor([1] + [0] * (slots - 1))) for a in actors])
        results = []
        for n in rows_list:
            counts = torch.full((slots,), n // slots, dtype=torch.int64)
            counts[: n % slots] += 1
            xs = [torch.randn(n, dim) for _ in range(shards)]
            ref = [ex.forward_grouped(x, counts) for ex, x in zip(experts, xs)]

            def local() -> list:
                with torch.inference_mode():
                    return [ex.forward_grouped(x, counts) for ex, x in zip(experts, xs)]

            def gloo() -> list:
                pend = [r.submit("layer", x, counts) for r, x in zip(remote, xs)]
                return [p() for p in pend]

            def via_ray() -> list:
                return ray.get([a.run.remote(x, counts) for a, x in zip(actors, xs)])

            for name, fn in (("gloo", gloo), ("ray", via_ray)):  # the transports return the in-process values
                for got, want in zip(fn(), ref):
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{name} output differs")
            row = {"rows_per_shard": n, "in_process_ms": _median_ms(local, reps), "gloo_ms": _median_ms(gloo, reps),
                   "ray_ms": _median_ms(via_ray, reps)}
            row["ray_over_gloo"] = row["ray_ms"] / row["gloo_ms"]
            results.append(row)
        for r in remote:
            r.close()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if started_ray:
            ray.shutdown()
    t = Table(title=f"Expert data plane: one MoE layer over {shards} shards x {slots} slots, D={dim}, I={inter} "
                    f"(median of {reps}, ms; {os.cpu_count()} cores)")
    for col in ("rows / shard", "in-process", "gloo pairs", "Ray actor calls", "ray / gloo"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(str(r["rows_per_shard"]), f"{r['in_process_ms']:.2f}", f"{r['gloo_ms']:.2f}", f"{r['ray_ms']:.2f}",
                  f"{r['ray_over_gloo']:.2f}x")
    Console(width=int(args.get("width", "150"))).print(t)
    return {"shards": shards, "slots": slots, "dim": dim, "inter": inter, "threads": threads, "reps": reps,
            "rows": results}
