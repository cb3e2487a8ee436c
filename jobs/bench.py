"""`python -m raymoe.jobs.bench <suite> [key=value ...]`: run one benchmark suite.

Every suite lives in ``raymoe.jobs.benches.<suite>`` and exposes ``run(args: dict[str, str]) -> dict``. The suite prints
its own table (rich) and returns a JSON-serialisable dict of results; this dispatcher writes that dict to
``<out>/<suite>.json`` (``out=`` defaults to ``bench_results``). Speed claims are always ratios measured side by side
inside one run, never absolute timings compared across runs.
"""
from __future__ import annotations

import importlib
import json
import pathlib
import pkgutil
import platform
import sys
import time

import raymoe.jobs.benches as _benches


def available_suites() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(_benches.__path__) if not m.name.startswith("_"))


def parse_args(argv: list[str]) -> tuple[str, dict[str, str]]:
    suites = available_suites()
    if not argv or argv[0] in {"-h", "--help"}:
        raise SystemExit(f"usage: python -m raymoe.jobs.bench <suite> [key=value ...]; suites: {', '.join(suites)}")
    suite, rest = argv[0], argv[1:]
    if suite not in suites:
        raise SystemExit(f"unknown bench suite {suite!r}; available: {', '.join(suites)}")
    args: dict[str, str] = {}
    for item in rest:
        if "=" not in item:
            raise SystemExit(f"bench arguments are key=value, got {item!r}")
        k, v = item.split("=", 1)
        args[k.strip()] = v.strip()
    return suite, args


def main(argv: list[str] | None = None) -> dict:
    suite, args = parse_args(sys.argv[1:] if argv is None else argv)
    out_dir = pathlib.Path(args.pop("out", "bench_results")).resolve()
    mod = importlib.import_module(f"raymoe.jobs.benches.{suite}")
    t0 = time.time()
    result = mod.run(args)
    record = {
        "suite": suite,
        "args": args,
        "wall_s": round(time.time() - t0, 2),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "result": result,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{suite}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
