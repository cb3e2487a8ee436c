"""Tokenizing on Ray Data gives the very shards the single-process build writes (same ids, same order, same files),
for every format (chat data with its loss mask included), over an object store, and through the prepare_data job
that training's cache then reuses."""
from __future__ import annotations

import gzip
import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.feather
import pyarrow.parquet as pq
import pytest

from raymoe.data.shards import read_manifest
from raymoe.data.sources import resolve_source
from raymoe.data.userdata import build_source, load_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"Row {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(10, 80)))) for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Several sources of each format, each split over files (and Parquet over row groups), plus an HF tokenizer."""
    import transformers

    from raymoe.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    texts = _texts(900, 0)
    out = {k: root / k for k in ("parquet", "jsonl", "text", "arrow", "ids", "chat")}
    for d in out.values():
        d.mkdir()
    for i in range(3):
        part = texts[i * 300:(i + 1) * 300]
        pq.write_table(pa.table({"text": part}), out["parquet"] / f"{i}.parquet", row_group_size=37)
        with gzip.open(out["jsonl"] / f"{i}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in part)
        pyarrow.feather.write_feather(pa.table({"text": part}), out["arrow"] / f"{i}.arrow",
                                      compression="uncompressed")
        pq.write_table(pa.table({"input_ids": [[(7 * j + k) % 300 + 4 for k in range(5 + j % 40)]
                                               for j in range(i * 300, (i + 1) * 300)]}), out["ids"] / f"{i}.parquet")
    with pa.CompressedOutputStream(str(out["jsonl"] / "3.jsonl.zst"), "zstd") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in _texts(50, 1)).encode())
    with open(out["chat"] / "chat.jsonl", "w") as f:  # conversations: rendered with the chat template, masked
        for i in range(0, 600, 3):
            f.write(json.dumps({"messages": [{"role": "user", "content": texts[i]},
                                             {"role": "assistant", "content": texts[i + 1]},
                                             {"role": "user", "content": texts[i + 2]},
                                             {"role": "assistant", "content": texts[i][:20]}]}) + "\n")
    for i, t in enumerate(texts[:40]):
        (out["text"] / f"{i:03d}.txt").write_text(t)
    tok = train_tokenizer(texts, 320)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token="<|pad|>",
                                                eos_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}### assistant:\n{% endif %}")
    out["tok"] = root / "tok"
    fast.save_pretrained(out["tok"])
    return out


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "text", "arrow", "ids", "chat"])
def test_ray_data_shards_equal_single_process_shards(fmt, corpus, ray_session, tmp_path) -> None:
    from raymoe.actors.data import ray_encoder

    src = resolve_source(str(corpus[fmt]), text_column="messages" if fmt == "chat" else "text",
                         token_column="input_ids" if fmt == "ids" else None)
    tok = load_tokenizer(str(corpus["tok"]))
    kw = dict(vocab_size=0, val_fraction=0.1, progress=False, shard_tokens=4096)
    local = build_source(src, tok, cache_dir=str(tmp_path / "local"), **kw)
    ray_dir = build_source(src, tok, cache_dir=str(tmp_path / "ray"), encoder=ray_encoder, **kw)
    ml, mr = read_manifest(local), read_manifest(ray_dir)
    assert mr["builder"] == "ray_encoder" and ml["builder"] == "local_encoder"
    assert mr["splits"]["train"]["documents"] > 0 and mr["splits"]["val"]["documents"] > 0
    assert mr["splits"] == ml["splits"]  # token and document counts, and every shard's sha256
    assert mr["splits"]["train"].get("loss_mask", False) == (fmt == "chat")
    for s in ml["splits"]["train"]["shards"]:
        assert (local / s["file"]).read_bytes() == (ray_dir / s["file"]).read_bytes()


def test_prepare_data_job_on_s3_then_training_reuses_the_build(corpus, ray_session, tmp_path, monkeypatch) -> None:
    from raymoe.config import DataConfig, ModelConfig, RunConfig
    from raymoe.data import open_datasets
    from raymoe.jobs.local_cluster import LocalS3
    from raymoe.jobs.prepare_data import prepare
    from raymoe.storage import Storage

    s3 = LocalS3("rmdata").start()
    try:
        for k, v in s3.env.items():
            monkeypatch.setenv(k, v)
        Storage(s3.uri("jsonl")).put_dir(corpus["jsonl"])
        run = RunConfig(model=ModelConfig.preset("tiny"),
                        data=DataConfig(source=[s3.uri("jsonl"), str(corpus["parquet"])], weights=[1.0, 2.0],
                                        tokenizer=str(corpus["tok"]), seq_len=32, cache_dir=str(tmp_path / "c")))
        info = prepare(run, progress=False)
        assert [read_manifest(pathlib.Path(d))["builder"] for d in info["dataset_dirs"]] == ["ray_encoder"] * 2
        train, val = open_datasets(run)  # what each rank does: finds the build, no rebuild
    finally:
        s3.stop()
    assert [str(p.dir) for p in train.parts] == info["dataset_dirs"]
    assert (len(train), len(val)) == (info["train_samples"], info["val_samples"])
    assert train.counts[1] == pytest.approx(2 * train.counts[0], abs=1)
