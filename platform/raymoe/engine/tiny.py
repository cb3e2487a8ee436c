"""A tiny, self-contained serving checkpoint: byte-level BPE + a briefly trained ``tiny`` DeepSeek-V3 with MTP.

``build_tiny_checkpoint(dir)`` trains a tokenizer on a few KB of built-in text, fits the ``tiny`` preset (vocabulary
cut to the tokenizer's) on that text for a few dozen AdamW steps (main + MTP loss, so MTP drafts are often accepted
and generations look like the text), and writes ``config.json`` + safetensors (:func:`raymoe.model.hf.save`) +
``tokenizer.json``, ``tokenizer_config.json`` (special tokens, chat template) and ``generation_config.json``
(:func:`raymoe.engine.chat.write_tokenizer_files`). Deterministic for a given seed; a few seconds on one CPU thread. Used by tests, the serve demo and
the serving bench; nothing is downloaded.
"""
from __future__ import annotations

import json
import pathlib
from typing import Optional

import torch

from raymoe.config import ModelConfig
from raymoe.data.tokenizer import train_tokenizer
from raymoe.engine.chat import write_tokenizer_files
from raymoe.model import DeepSeekV3, hf

__all__ = ["TINY_TEXT", "build_tiny_checkpoint", "tiny_corpus"]

TINY_TEXT = """\
The river runs past the old mill and under the stone bridge, where the children stop to watch the boats.
In the morning the baker opens the shop, and the smell of bread fills the narrow street.
The engine reads a prompt, splits it into tokens, and writes the answer one token at a time.
A block of memory holds sixteen tokens; a table of blocks holds the whole sequence.
When the memory is full, the newest request waits, and its tokens are computed again later.
The quick brown fox jumps over the lazy dog, and the dog does not mind at all.
Every expert in the layer reads only the tokens that the router sends to it.
The draft model guesses the next token, and the large model checks the guess in one step.
If the guess is right, two tokens come out of one step; if it is wrong, nothing is lost.
Rain fell on the hills all night, and by noon the streams were loud and fast.
She counted the stars: one, two, three, four, five, six, seven, eight, nine, ten.
The server answers with a stream of small pieces, and the last piece says that it is done.
"""


def tiny_corpus(repeat: int = 4) -> list[str]:
    lines = [l for l in TINY_TEXT.splitlines() if l.strip()]
    return [" ".join(lines[i:] + lines[:i]) for i in range(len(lines))] * repeat


def build_tiny_checkpoint(path: str | pathlib.Path, seed: int = 0, vocab_size: int = 512, train_steps: int = 30,
                          mtp_depth: int = 1, config: Optional[ModelConfig] = None) -> pathlib.Path:
    """Write a tiny trained checkpoint + ``tokenizer.json`` into ``path``; returns ``path``."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(tiny_corpus(1), vocab_size=vocab_size, min_frequency=2)
    cfg = (config or ModelConfig.preset("tiny")).replace(vocab_size=tok.vocab_size,
                                                         num_nextn_predict_layers=mtp_depth)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DeepSeekV3(cfg)
    if train_steps > 0:
        stream = [t for doc in tiny_corpus(1) for t in tok.encode(doc) + [tok.eod_id]]
        data = torch.tensor(stream)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        T, B = 48, 4
        model.train()
        for _ in range(train_steps):
            starts = torch.randint(0, len(stream) - T - 1, (B,), generator=g)
            x = torch.stack([data[s : s + T] for s in starts])
            y = torch.stack([data[s + 1 : s + T + 1] for s in starts])
            loss = model(x, labels=y).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
    hf.save(model, path)
    tok.backend.save(str(path / "tokenizer.json"))
    cfg_file = path / "config.json"
    hf_cfg = json.loads(cfg_file.read_text())
    hf_cfg.update(eos_token_id=tok.eod_id, bos_token_id=tok.eod_id, pad_token_id=tok.pad_id)
    cfg_file.write_text(json.dumps(hf_cfg, indent=2))
    write_tokenizer_files(path, tok.eod_id, tok.pad_id, cfg.max_position_embeddings)
    return path
