"""data.source files → shards: every format, object-store URIs (moto), HF tokenizers (saved by transformers, the
oracle for the ids), pre-tokenized rows, validation rules, weighted mixtures and their resumable order, errors."""
from __future__ import annotations

import gzip
import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.feather
import pyarrow.parquet as pq
import pytest

from raymoe.config import ConfigError, DataConfig, ModelConfig, RunConfig
from raymoe.data import ResumableSampler
from raymoe.data.mixture import MixedDataset, mixture_counts
from raymoe.data.shards import PackedDataset, read_manifest
from raymoe.data.sources import held_out, resolve_source
from raymoe.data.userdata import DataSpec, build_all, build_source, load_tokenizer, open_all, prepare_user_data

WORDS = "the king queen crown sword night day love death war peace river hill town field bread wine".split()


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"Doc {seed}-{i}. " + " ".join(rng.choice(WORDS, size=int(rng.integers(20, 60)))) for i in range(n)]


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory) -> pathlib.Path:
    """An HF tokenizer directory written by transformers' save_pretrained (bos != eos, a pad token)."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_texts(200, 99), trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    d = tmp_path_factory.mktemp("hf_tok")
    fast.save_pretrained(d)
    return d


def _expected(texts: list[str], tok_dir: pathlib.Path, val_fraction: float) -> dict[str, list[int]]:
    """The two streams computed with transformers: [bos] + ids + [eos] per document, split by the content hash."""
    import transformers

    fast = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    out: dict[str, list[int]] = {"train": [], "val": []}
    for t in texts:
        ids = [fast.bos_token_id] + fast(t, add_special_tokens=False)["input_ids"] + [fast.eos_token_id]
        out["val" if held_out(t, val_fraction) else "train"].extend(ids)
    return out


def _stream(build_dir: pathlib.Path, split: str) -> list[int]:
    m = read_manifest(build_dir)
    if not m["splits"][split]["tokens"]:
        return []
    return PackedDataset(build_dir, split, 1, m).tokens(0, m["splits"][split]["tokens"]).tolist()


def _write(fmt: str, d: pathlib.Path, texts: list[str]) -> pathlib.Path:
    """``texts`` as a source of format ``fmt`` split over two files (rows in order)."""
    d.mkdir(parents=True)
    halves = [texts[: len(texts) // 2], texts[len(texts) // 2:]]
    for i, part in enumerate(halves):
        if fmt == "parquet":
            pq.write_table(pa.table({"text": part, "n": list(range(len(part)))}), d / f"{i}.parquet",
                           row_group_size=7)
        elif fmt == "jsonl.gz":
            with gzip.open(d / f"{i}.jsonl.gz", "wt") as f:
                f.writelines(json.dumps({"text": t, "meta": {"i": j}}) + "\n" for j, t in enumerate(part))
        elif fmt == "jsonl.zst":
            with pa.CompressedOutputStream(str(d / f"{i}.jsonl.zst"), "zstd") as f:
                f.write("".join(json.dumps({"text": t}) + "\n" for t in part).encode())
        elif fmt == "arrow":
            if i == 0:
                pyarrow.feather.write_feather(pa.table({"text": part}), d / "0.arrow", compression="uncompressed")
            else:  # the IPC stream format is read too
                with pa.OSFile(str(d / "1.arrow"), "wb") as sink, \
                        pa.ipc.new_stream(sink, pa.schema([("text", pa.string())])) as w:
                    w.write_table(pa.table({"text": part}))
        elif fmt == "text":
            for j, t in enumerate(part):
                (d / f"{i}-{j:03d}.txt").write_text(t)
    (d / "_SUCCESS").write_text("")  # markers and hidden files are skipped
    return d


@pytest.mark.parametrize("fmt", ["parquet", "jsonl.gz", "jsonl.zst", "arrow", "text"])
def test_each_format_gives_the_transformers_token_stream(fmt, tmp_path, hf_tok) -> None:
    texts = _texts(40, 1)
    src = resolve_source(str(_write(fmt, tmp_path / "src", texts)))
    assert len(src.files) == (40 if fmt == "text" else 2)
    d = build_source(src, load_tokenizer(str(hf_tok)), vocab_size=0, val_fraction=0.2,
                     cache_dir=str(tmp_path / "cache"), progress=False, shard_tokens=500)
    want = _expected(texts, hf_tok, 0.2)
    assert 0 < len(want["val"]) < len(want["train"])
    assert _stream(d, "train") == want["train"]
    assert _stream(d, "val") == want["val"]
    m = read_manifest(d)
    assert len(m["splits"]["train"]["shards"]) > 1  # the stream crosses shard files
    assert (m["eod_id"], m["bos_id"], m["pad_id"]) == (2, 1, 3)
    assert (d / "tokenizer_config.json").read_bytes() == (hf_tok / "tokenizer_config.json").read_bytes()


def test_build_is_cached_and_rebuilt_when_a_file_changes(tmp_path, hf_tok) -> None:
    src_dir = _write("parquet", tmp_path / "src", _texts(20, 2))
    calls = []

    def counting(*args):
        from raymoe.data.userdata import local_encoder

        calls.append(1)
        yield from local_encoder(*args)

    tok = load_tokenizer(str(hf_tok))
    kw = dict(vocab_size=0, val_fraction=0.1, cache_dir=str(tmp_path / "c"), progress=False, encoder=counting)
    a = build_source(resolve_source(str(src_dir)), tok, **kw)
    assert build_source(resolve_source(str(src_dir)), tok, **kw) == a and len(calls) == 1
    pq.write_table(pa.table({"text": _texts(5, 3)}), src_dir / "0.parquet")
    b = build_source(resolve_source(str(src_dir)), tok, **kw)
    assert b != a and len(calls) == 2


def test_object_store_source_and_tokenizer_match_local(tmp_path, hf_tok) -> None:
    from raymoe.jobs.local_cluster import LocalS3
    from raymoe.storage import Storage

    texts = _texts(30, 4)
    src_dir = _write("jsonl.zst", tmp_path / "src", texts)
    s3 = LocalS3("rmdata").start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in s3.env.items():
                mp.setenv(k, v)
            Storage(s3.uri("corpus")).put_dir(src_dir)
            Storage(s3.uri("tok")).put_dir(hf_tok)
            spec = DataSpec(sources=(s3.uri("corpus"),), tokenizer=s3.uri("tok"), model_vocab_size=512,
                            val_fraction=0.2, seq_len=8, cache_dir=str(tmp_path / "c"))
            info = prepare_user_data(spec, progress=False)
    finally:
        s3.stop()
    remote = pathlib.Path(info["dataset_dir"])
    local = build_source(resolve_source(str(src_dir)), load_tokenizer(str(hf_tok)), vocab_size=0, val_fraction=0.2,
                         cache_dir=str(tmp_path / "c2"), progress=False)
    assert read_manifest(remote)["splits"] == read_manifest(local)["splits"]  # same shard sha256s
    assert _stream(remote, "train") == _expected(texts, hf_tok, 0.2)["train"]
    assert (info["bos_token_id"], info["eos_token_id"], info["pad_token_id"]) == (1, 2, 3)


def test_pretokenized_column(tmp_path, hf_tok) -> None:
    rows = [[5, 6, 7, 8] * (i + 3) for i in range(30)]
    d = tmp_path / "tok.parquet"
    pq.write_table(pa.table({"input_ids": rows}), d)
    out = build_source(resolve_source(str(d), token_column="input_ids"), load_tokenizer(str(hf_tok)), vocab_size=0,
                       val_fraction=0.2, cache_dir=str(tmp_path / "c"), progress=False)
    want = [t for r in rows if not held_out(r, 0.2) for t in [1, *r, 2]]
    assert _stream(out, "train") == want
    pq.write_table(pa.table({"input_ids": [[1, 2, 100000]]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="id 100000 outside the tokenizer's vocabulary"):
        build_source(resolve_source(str(tmp_path / "bad.parquet"), token_column="input_ids"),
                     load_tokenizer(str(hf_tok)), vocab_size=0, val_fraction=0.2, cache_dir=str(tmp_path / "c"),
                     progress=False)


def test_train_tokenizer_on_a_text_source(tmp_path) -> None:
    texts = _texts(40, 5)
    src = _write("parquet", tmp_path / "src", texts)
    spec = DataSpec(sources=(str(src),), tokenizer="train", vocab_size=300, model_vocab_size=512, seq_len=8,
                    val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    train, val, tok = open_all(spec, build_all(spec, progress=False))
    stream = [t for x in texts if not held_out(x, 0.2) for t in tok.encode(x) + [tok.eod_id]]
    assert train.parts[0].tokens(0, len(stream)).tolist() == stream
    assert tok.vocab_size <= 300 and len(val) > 0


def test_val_source_and_weighted_mixture(tmp_path, hf_tok) -> None:
    a, b, v = _texts(40, 6), _texts(10, 7), _texts(8, 8)
    spec = DataSpec(sources=(str(_write("parquet", tmp_path / "a", a)), str(_write("jsonl.gz", tmp_path / "b", b))),
                    weights=(1.0, 1.0), tokenizer=str(hf_tok), model_vocab_size=512, seq_len=16,
                    val_source=str(_write("text", tmp_path / "v", v)), cache_dir=str(tmp_path / "c"))
    train, val, tok = open_all(spec, build_all(spec, progress=False))
    # nothing held out of the train sources; the validation set is the val source, whole
    assert [p.num_tokens for p in train.parts] == [len(_expected(a, hf_tok, 0.0)["train"]),
                                                   len(_expected(b, hf_tok, 0.0)["train"])]
    assert val.parts[0].tokens(0, val.num_tokens).tolist() == _expected(v, hf_tok, 1.0)["val"]
    # equal weights: each source fills half of an epoch although a holds ~4x the samples of b
    assert train.counts == mixture_counts(train.sizes, [1, 1]) and abs(train.counts[0] - train.counts[1]) <= 1
    epoch = np.array([train.locate(j)[0] for j in ResumableSampler(len(train), seed=3).permutation(0)])
    assert (epoch == 1).sum() == train.counts[1]
    j = train.counts[0] + 5
    np.testing.assert_array_equal(train.window(j), train.parts[1].window(5 % train.sizes[1]))


def test_mixture_map_and_resumable_order() -> None:
    assert mixture_counts([100, 300], [0.75, 0.25]) == [300, 100]
    assert mixture_counts([3, 5], None) == [3, 5]
    assert sum(mixture_counts([7, 11, 13], [0.2, 0.3, 0.5])) == 31
    with pytest.raises(ValueError, match="one per source"):
        mixture_counts([1, 2], [1.0])

    class Part:  # a PackedDataset stand-in with a known window per sample
        def __init__(self, n: int, base: int) -> None:
            self.n, self.base, self.seq_len, self.num_tokens, self.dir = n, base, 4, n * 4 + 1, f"p{base}"

        def __len__(self) -> int:
            return self.n

        def window(self, i: int) -> np.ndarray:
            return np.full(5, self.base + i, dtype=np.int32)

    mix = MixedDataset([Part(100, 0), Part(300, 1000)], weights=[0.75, 0.25])
    assert [mix.locate(j) for j in (0, 99, 100, 299, 300, 301, 399)] == [
        (0, 0), (0, 99), (0, 0), (0, 99), (1, 0), (1, 3), (1, 297)]
    # one sampler, interrupted and resumed, sees the uninterrupted order of mixture samples
    full = ResumableSampler(len(mix), seed=1)
    ref = [mix.batch(full.next_batch(24))[0] for _ in range(30)]
    first = ResumableSampler(len(mix), seed=1)
    got = [mix.batch(first.next_batch(24))[0] for _ in range(11)]
    resumed = ResumableSampler(len(mix), seed=1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [mix.batch(resumed.next_batch(24))[0] for _ in range(19)]
    assert all((a == b).all() for a, b in zip(ref, got))
    # per epoch the up-weighted source appears 3x per sample, the down-weighted one as an even third of its samples
    seen = np.concatenate([mix.batch(range(j, j + 50))[0][:, 0].numpy() for j in range(0, 400, 50)])
    assert np.bincount(seen[seen < 1000]).tolist() == [3] * 100
    assert sorted(seen[seen >= 1000] - 1000) == list(range(0, 300, 3))


def test_errors_name_the_problem(tmp_path, hf_tok) -> None:
    src = _write("parquet", tmp_path / "p", _texts(10, 9))
    with pytest.raises(ValueError, match=r"no column 'body' \(data.text_column\); its columns are \['text', 'n'\]"):
        build_source(resolve_source(str(src), text_column="body"), load_tokenizer(str(hf_tok)), vocab_size=0,
                     val_fraction=0.1, cache_dir=str(tmp_path / "c"), progress=False)
    from raymoe.data.userdata import check_spec

    with pytest.raises(ValueError, match=r"no column 'body'"):  # before any build (prepare_data: before Ray)
        check_spec(DataSpec(sources=(str(src),), text_column="body", tokenizer=str(hf_tok), model_vocab_size=512))
    (src / "x.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match=r"mixes formats \['jsonl', 'parquet'\]"):
        resolve_source(str(src))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="has 400 token ids but model.vocab_size=300"):
        build_all(DataSpec(sources=(str(tmp_path / "p" / "0.parquet"),), tokenizer=str(hf_tok), model_vocab_size=300))
    two = DataSpec(sources=(str(src / "0.parquet"), str(src / "1.parquet")), tokenizer="train", vocab_size=300,
                   model_vocab_size=512)
    with pytest.raises(ValueError, match="data.tokenizer=train learns a BPE from one text source"):
        build_all(two, progress=False)
    with pytest.raises(FileNotFoundError, match="lacks"):
        load_tokenizer(str(tmp_path))


def test_config_keys_validate() -> None:
    assert DataConfig(source="/abs/data.parquet").source == ["/abs/data.parquet"]
    for kwargs, msg in (({"source": ["rel/path"]}, "relative"),
                        ({"source": ["/a", "/b"], "weights": [1.0]}, "one weight per source"),
                        ({"tokenizer": "/tok"}, "needs data.source"),
                        ({"source": ["/a"], "token_column": "ids"}, "needs data.tokenizer"),
                        ({"val_fraction": 0.0}, "val_fraction must be in")):
        with pytest.raises(ConfigError, match=msg):
            DataConfig(**kwargs)


def test_run_entry_points_use_the_mixture(tmp_path, hf_tok) -> None:
    from raymoe.data import open_datasets, prepare_data

    src = _write("jsonl.gz", tmp_path / "s", _texts(60, 10))
    run = RunConfig(model=ModelConfig.preset("tiny"),
                    data=DataConfig(source=[str(src)], tokenizer=str(hf_tok), seq_len=16, val_fraction=0.2,
                                    cache_dir=str(tmp_path / "c")))
    info = prepare_data(run, progress=False)
    train, val = open_datasets(run)
    assert (info["train_samples"], info["val_samples"]) == (len(train), len(val))
    assert info["eos_token_id"] == 2 and pathlib.Path(info["tokenizer_dir"], "tokenizer_config.json").is_file()
    x, y = train.batch([0, 1])
    assert x.shape == (2, 16) and (x[:, 1:] == y[:, :-1]).all()


def test_training_on_a_source_writes_the_tokenizer_into_checkpoint_and_export(tmp_path, hf_tok) -> None:
    """A short run (one local rank) on a JSONL source with an HF tokenizer: the checkpoint carries data.json and the
    tokenizer files, the export the tokenizer's bos/eos/pad; the first batch is the mixture's own samples."""
    import torch

    from raymoe.config import BalanceConfig, LoggerConfig, ParallelConfig, TrainConfig
    from raymoe.data import prepare_data
    from raymoe.train.controller import TrainController
    from raymoe.train.worker_group import LocalWorkerGroup

    src = _write("jsonl.gz", tmp_path / "s", _texts(80, 11))
    run = RunConfig(model=ModelConfig.preset("tiny"), parallel=ParallelConfig(dp=1),
                    train=TrainConfig(steps=2, micro_batch_size=2, num_microbatches=1, checkpoint_every=2,
                                      eval_every=100, eval_batches=1, warmup_tokens=64, seed=0),
                    data=DataConfig(source=[str(src)], tokenizer=str(hf_tok), seq_len=16, val_fraction=0.2,
                                    cache_dir=str(tmp_path / "c")),
                    logger=LoggerConfig(kind="none"), balance=BalanceConfig(histogram_every=100),
                    run_dir=str(tmp_path / "run"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    info = prepare_data(run, progress=False)
    group = LocalWorkerGroup(run, 0)
    ctrl = TrainController(run, group, info["train_samples"], info["val_samples"], data_info=info)
    try:
        summary = ctrl.run_loop()
    finally:
        ctrl.close()
        group.shutdown()
        torch.set_num_threads(threads)
    assert summary["finished"] and all(np.isfinite(summary["losses"]))
    ck = pathlib.Path(summary["checkpoint"])
    data = json.loads((ck / "data.json").read_text())
    assert (data["bos_token_id"], data["eos_token_id"], data["pad_token_id"]) == (1, 2, 3)
    assert (ck / "hf_extra" / "tokenizer_config.json").read_bytes() == (hf_tok / "tokenizer_config.json").read_bytes()
    hf = pathlib.Path(summary["hf_export"])
    gen = json.loads((hf / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 3)
    assert (hf / "tokenizer_config.json").is_file()


CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory) -> pathlib.Path:
    """An HF tokenizer with a ChatML chat template, saved by transformers."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<s>", "</s>", "<pad>", "<|im_start|>",
                                                                  "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_texts(200, 98), trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.chat_template = CHATML
    d = tmp_path_factory.mktemp("chat_tok")
    fast.save_pretrained(d)
    return d


def _conversations(n: int) -> list[list[dict]]:
    rng = np.random.default_rng(12)
    out = []
    for i in range(n):
        conv = [{"role": "system", "content": f"You are helper {i}."}]
        for _ in range(1 + i % 3):
            conv.append({"role": "user", "content": " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))})
            conv.append({"role": "assistant", "content": " ".join(rng.choice(WORDS, size=int(rng.integers(2, 7))))})
        out.append(conv)
    return out


def test_chat_data_masks_all_but_assistant_tokens_and_the_loss_follows(tmp_path, chat_tok) -> None:
    """Chat JSONL through the chat template: the text is transformers' rendering, the trained tokens are exactly the
    assistant turns (their content and closing marker), and the model's main and MTP losses equal a hand-computed
    mean over those target positions only."""
    import torch
    import transformers

    from raymoe.model import DeepSeekV3

    convs = _conversations(60)
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    spec = DataSpec(sources=(str(src),), text_column="messages", tokenizer=str(chat_tok), model_vocab_size=4096,
                    seq_len=32, val_fraction=0.1, cache_dir=str(tmp_path / "c"))
    train, val, tok = open_all(spec, build_all(spec, progress=False))
    part = train.parts[0]
    assert part.has_mask and val.parts[0].has_mask

    fast = transformers.AutoTokenizer.from_pretrained(str(chat_tok))
    stream = part.tokens(0, part.num_tokens).tolist()
    mask = part.loss_mask(0, part.num_tokens).tolist()
    pos = 0
    train_convs = [c for c in convs if not held_out(c, 0.1)]
    assert 0 < len(train_convs) < len(convs)
    for c in train_convs:  # document by document: the text, then which tokens are trained on
        n = stream.index(fast.eos_token_id, pos) - pos  # the template emits no eos: the document's end
        ids, m = stream[pos:pos + n], mask[pos:pos + n]
        text = fast.apply_chat_template(c, tokenize=False)
        assert ids == fast(text, add_special_tokens=False)["input_ids"]
        assert stream[pos + n] == fast.eos_token_id and mask[pos + n] == 0
        want = "".join(f"{x['content']}<|im_end|>\n" for x in c if x["role"] == "assistant")
        assert fast.decode([t for t, k in zip(ids, m) if k]) == want
        pos += n + 1
    assert pos == len(stream)

    torch.manual_seed(0)
    model = DeepSeekV3(ModelConfig.preset("tiny")).eval()
    assert model.config.num_nextn_predict_layers == 1
    sample_ids = [0, 3, 7, 11]
    x, y = train.batch(sample_ids)
    assert (y == -100).any() and (y != -100).any()
    with torch.no_grad():
        out = model(x, labels=y)
    w = np.stack([part.window(i) for i in sample_ids])
    wm = np.stack([part.window_mask(i) for i in sample_ids]).astype(bool)

    def hand_loss(logits: torch.Tensor, shift: int) -> float:  # targets w[:, t + shift], trained where wm[:, t+shift]
        T = logits.shape[1]
        logp = torch.log_softmax(logits.double(), dim=-1)
        total, count = 0.0, 0
        for b in range(len(sample_ids)):
            for t in range(T):
                if wm[b, t + shift]:
                    total -= float(logp[b, t, int(w[b, t + shift])])
                    count += 1
        return total / count

    assert float(out.main_loss) == pytest.approx(hand_loss(out.logits, 1), abs=1e-5)
    assert float(out.mtp_losses[0]) == pytest.approx(hand_loss(out.mtp_logits[0], 2), abs=1e-5)


def test_a_fully_masked_batch_has_zero_loss_and_gradient() -> None:
    import torch

    from raymoe.model.layers import cross_entropy

    logits = torch.randn(6, 11, requires_grad=True)
    loss = cross_entropy(logits, torch.full((6,), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(logits.grad.abs().sum()) == 0.0


def test_a_shard_directory_is_a_source_as_it_is(tmp_path, hf_tok, chat_tok) -> None:
    texts = _texts(40, 13)
    first = DataSpec(sources=(str(_write("parquet", tmp_path / "p", texts)),), tokenizer=str(hf_tok),
                     model_vocab_size=512, seq_len=16, val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    built = pathlib.Path(prepare_user_data(first, progress=False)["dataset_dir"])
    again = DataSpec(sources=(str(built),), tokenizer=str(hf_tok), model_vocab_size=512, seq_len=16,
                     cache_dir=str(tmp_path / "c2"))
    info = prepare_user_data(again, progress=False)
    assert info["dataset_dir"] == str(built) and not (tmp_path / "c2").exists()  # opened, not rebuilt
    train, _, _ = open_all(again, build_all(again, progress=False))
    assert train.parts[0].tokens(0, 50).tolist() == _expected(texts, hf_tok, 0.2)["train"][:50]
    other = DataSpec(sources=(str(built),), tokenizer=str(chat_tok), model_vocab_size=512, seq_len=16)
    with pytest.raises(ValueError, match="was tokenized with another tokenizer"):
        build_all(other, progress=False)
