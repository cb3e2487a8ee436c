"""`python -m raymoe.jobs.bench data [copies=2 files=16 vocab=4096 nodes=1 out=...]`: tokenizing throughput.

What it measures: tokens/s of a whole build (read → tokenize → hold out → write shards) of a Parquet corpus made
from the bundled plays (each play cut into paragraphs, one document per paragraph, ``copies`` renamed copies of the
corpus over ``files`` files) with an HF tokenizer directory (our BPE at ``vocab`` with a hand-written
``tokenizer_config.json``):

* ``encode_only``: the tokenizer alone, ``encode_batch`` over the documents in this process: the floor-side figure
  every other number is checked against (n CPUs cannot beat n × this rate by more than a 1.25 margin, else the
  bench fails: a measurement bug);
* ``local``: the single-process build (:func:`raymoe.data.userdata.local_encoder`);
* ``ray_1cpu`` / ``ray_2cpu``: the Ray Data build on an embedded Ray with 1 and 2 CPUs;
* ``cluster_1node`` / ``cluster_2nodes`` (``nodes=1``; ``nodes=0`` skips): the Ray Data build on a
  :class:`LocalCluster` with 1 or 2 one-CPU worker nodes, the corpus read from a moto S3 server (no shared disk).

Every build must produce the same shards (equal manifest ``splits``, i.e. every shard's sha256): checked. Ratios are
side by side in one run; on a shared or small machine the 2-CPU / 2-node figures are bounded by the cores actually
free (the table prints ``os.cpu_count()``).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import time
from typing import Any

SLACK = 1.25


def _corpus(work: pathlib.Path, copies: int, files: int) -> tuple[pathlib.Path, list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raymoe.data.corpus import corpus_source

    docs = []
    for c in range(copies):
        for d in corpus_source("shakespeare").documents():
            docs += [f"[{c}] {p}" for p in d.text.split("\n\n") if p.strip()]
    src = work / "corpus"
    src.mkdir()
    per = -(-len(docs) // files)
    for i in range(files):
        pq.write_table(pa.table({"text": docs[i * per:(i + 1) * per]}), src / f"part-{i:03d}.parquet")
    return src, docs


def _tokenizer(work: pathlib.Path, docs: list[str], vocab: int) -> pathlib.Path:
    import json

    from raymoe.data.tokenizer import EOD_TOKEN, PAD_TOKEN, train_tokenizer

    d = work / "tok"
    d.mkdir()
    train_tokenizer(docs[: len(docs) // 4], vocab).backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOD_TOKEN, "pad_token": PAD_TOKEN}))
    return d


def _build_kept(src_uri: str, tok_dir: pathlib.Path, cache: pathlib.Path, encoder) -> tuple[float, dict[str, Any]]:
    from raymoe.data.shards import read_manifest
    from raymoe.data.sources import resolve_source
    from raymoe.data.userdata import build_source, load_tokenizer

    source, tok = resolve_source(src_uri), load_tokenizer(str(tok_dir))
    t0 = time.perf_counter()
    out = build_source(source, tok, vocab_size=0, val_fraction=0.05, cache_dir=str(cache), encoder=encoder,
                       progress=False)
    dt = time.perf_counter() - t0
    splits = read_manifest(out)["splits"]
    shutil.rmtree(cache, ignore_errors=True)
    return dt, splits


def run(args: dict[str, str]) -> dict[str, Any]:
    from raymoe.jobs.cluster import configure_process_env

    # before `import ray`: the embedded builds bind loopback only and run without token auth. Without it ray.init
    # sets RAY_AUTH_MODE=token in this process, the local cluster's nodes inherit it, and its dashboard answers 401
    configure_process_env()
    import ray
    from rich.console import Console
    from rich.table import Table

    from raymoe.actors.data import ray_encoder
    from raymoe.data.tokenizer import Tokenizer
    from raymoe.data.userdata import local_encoder

    copies, files = int(args.get("copies", 2)), int(args.get("files", 16))
    vocab, nodes = int(args.get("vocab", 4096)), int(args.get("nodes", 1))
    first_ip = int(args.get("first_ip", 60))
    start_timeout = float(args.get("start_timeout_s", 400))
    cluster_error = None
    if ray.is_initialized():
        raise SystemExit("bench data starts its own Ray instances: run it in a fresh process")
    work = pathlib.Path(tempfile.mkdtemp(prefix="raymoe-bench-data-"))
    rows: list[dict[str, Any]] = []
    try:
        src, docs = _corpus(work, copies, files)
        tok_dir = _tokenizer(work, docs, vocab)
        tok = Tokenizer.from_pretrained(tok_dir)
        t0 = time.perf_counter()
        n_tok = sum(len(ids) for ids in tok.encode_batch(docs))
        encode_rate = n_tok / (time.perf_counter() - t0)
        rows.append({"config": "encode_only", "cpus": 1, "nodes": 1, "seconds": n_tok / encode_rate,
                     "tokens_per_s": encode_rate})

        def record(name: str, cpus: int, n_nodes: int, dt: float, splits: dict[str, Any]) -> None:
            tokens = sum(s["tokens"] for s in splits.values())
            rows.append({"config": name, "cpus": cpus, "nodes": n_nodes, "seconds": dt, "tokens_per_s": tokens / dt,
                         "splits": splits})

        dt, splits = _build_kept(str(src), tok_dir, work / "cache", local_encoder)
        record("local", 1, 1, dt, splits)
        for cpus in (1, 2):
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                     object_store_memory=256 * 2**20)
            try:
                dt, splits = _build_kept(str(src), tok_dir, work / "cache", ray_encoder)
            finally:
                ray.shutdown()
            record(f"ray_{cpus}cpu", cpus, 1, dt, splits)
        if nodes:
            from raymoe.jobs.local_cluster import LocalCluster, LocalS3
            from raymoe.storage import Storage

            s3 = LocalS3("benchdata").start()
            saved = {k: os.environ.get(k) for k in s3.env}
            os.environ.update(s3.env)
            try:
                Storage(s3.uri("corpus")).put_dir(src)
                for n_nodes in (1, 2):
                    cluster = LocalCluster(work / f"cluster{n_nodes}", extra_env=s3.env, first_ip=first_ip)
                    try:
                        cluster.start(workers=n_nodes, cpus_per_worker=1, head_cpus=0, timeout_s=start_timeout)
                    except TimeoutError as e:  # a loaded machine: keep the numbers measured so far, say why
                        cluster.stop()
                        cluster_error = f"{n_nodes}-node cluster did not start: {e}"
                        break
                    try:
                        ray.init(address=cluster.address, log_to_driver=False)
                        try:
                            dt, splits = _build_kept(s3.uri("corpus"), tok_dir, work / "cache", ray_encoder)
                        finally:
                            ray.shutdown()
                    finally:
                        cluster.stop()
                    record(f"cluster_{n_nodes}node{'s' if n_nodes > 1 else ''}", n_nodes, n_nodes, dt, splits)
            finally:
                s3.stop()
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ref = rows[1]["splits"]
    problems = [f"{r['config']}: shards differ from the single-process build" for r in rows[2:]
                if r["splits"] != ref]
    problems += [f"{r['config']}: {r['tokens_per_s']:.0f} tok/s beats {r['cpus']} x the tokenizer's own rate "
                 f"({encode_rate:.0f} tok/s) by more than {SLACK}x: a measurement bug"
                 for r in rows[1:] if r["tokens_per_s"] > SLACK * r["cpus"] * encode_rate]
    by = {r["config"]: r["tokens_per_s"] for r in rows}
    ratios = {"ray_2cpu/ray_1cpu": by["ray_2cpu"] / by["ray_1cpu"], "ray_1cpu/local": by["ray_1cpu"] / by["local"]}
    if "cluster_2nodes" in by:
        ratios["cluster_2nodes/cluster_1node"] = by["cluster_2nodes"] / by["cluster_1node"]
    t = Table(title=f"data build: {len(docs)} documents, {rows[1]['splits']['train']['tokens']:,} train tokens, "
                    f"{files} Parquet files, vocab {vocab}, os.cpu_count()={os.cpu_count()}")
    for col in ("config", "CPUs", "nodes", "seconds", "tokens/s", "vs encode_only"):
        t.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        t.add_row(r["config"], str(r["cpus"]), str(r["nodes"]), f"{r['seconds']:.2f}", f"{r['tokens_per_s']:,.0f}",
                  f"{r['tokens_per_s'] / encode_rate:.2f}x")
    Console().print(t)
    Console().print("ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))
    if cluster_error:
        Console().print(f"[yellow]cluster rows not measured: {cluster_error}[/yellow]")
    for r in rows:
        r.pop("splits", None)
    if problems:
        raise SystemExit("bench data failed: " + "; ".join(problems))
    return {"rows": rows, "ratios": ratios, "documents": len(docs), "cpu_count": os.cpu_count(),
            "cluster_error": cluster_error}
