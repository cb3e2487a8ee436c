"""Byte-level BPE trained locally with HF ``tokenizers`` on the training split only.

Recipe (GPT-2 style byte-level BPE): the text is split by the ``ByteLevel`` pre-tokenizer (GPT-2 regex, no prefix
space), every byte maps to one of 256 printable symbols, and BPE merges are learnt from the training documents
until the vocabulary holds ``vocab_size`` entries. Because all 256 byte symbols are always in the initial alphabet,
any string encodes (no unknown token) and ``decode(encode(s)) == s`` for every string that contains no special
token text.

Ids: the special tokens come first — ``<|endoftext|>`` (id 0, the end-of-document token that joins documents in the
packed stream) and ``<|pad|>`` (id 1, for padded inference batches; never in training data) — then the 256 byte
symbols, then the merges. ``vocab_size`` counts all of them; a corpus too small to fill it yields fewer merges (the
manifest records the actual size, which is never larger than the requested one, so token ids always fit an
embedding of the requested size).

Why only the training split: the validation plays must be unseen text, and a tokenizer fit on them would leak their
rare words (character names) into the vocabulary. On the 5 MB Shakespeare corpus, training takes about 1.5 s
and is deterministic (the same corpus and vocabulary size give a byte-identical ``tokenizer.json``; the sha256 of that
file is the manifest's ``tokenizer_sha256``).

The saved ``tokenizer.json`` is the standard ``tokenizers`` format, so ``transformers.PreTrainedTokenizerFast(
tokenizer_file=...)`` loads it too (HF export and serving reuse it).
"""
from __future__ import annotations

import pathlib
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

__all__ = ["EOD_TOKEN", "PAD_TOKEN", "SPECIAL_TOKENS", "MIN_VOCAB_SIZE", "Tokenizer", "train_tokenizer"]

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (EOD_TOKEN, PAD_TOKEN)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens, before any merge


class Tokenizer:
    """A trained byte-level BPE (thin wrapper over ``tokenizers.Tokenizer``).

    Example::

        tok = Tokenizer.from_file(path)
        ids = tok.encode("To be, or not to be")   # list[int]
        tok.decode(ids)                            # 'To be, or not to be'
        tok.eod_id, tok.vocab_size                 # 0, 4096
    """

    def __init__(self, backend: tokenizers.Tokenizer, path: pathlib.Path | None = None) -> None:
        self.backend = backend
        self.path = path
        eod = backend.token_to_id(EOD_TOKEN)
        pad = backend.token_to_id(PAD_TOKEN)
        if eod is None or pad is None:
            raise ValueError(f"tokenizer lacks the special tokens {SPECIAL_TOKENS} (not built by raymoe.data?)")
        self.eod_id: int = eod
        self.pad_id: int = pad

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> "Tokenizer":
        path = pathlib.Path(path)
        return cls(tokenizers.Tokenizer.from_file(str(path)), path)

    @property
    def vocab_size(self) -> int:
        """Number of ids in use (special tokens included); ids are ``0 .. vocab_size-1``."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text → token ids. Special-token text inside ``text`` maps to its special id."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eod_id={self.eod_id}, path={self.path})"


def _check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size!r} is too small for a byte-level BPE: it needs at least {MIN_VOCAB_SIZE} "
            f"(256 byte symbols + {len(SPECIAL_TOKENS)} special tokens {list(SPECIAL_TOKENS)}) plus room for merges"
        )


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` (the training documents).

    Args:
        texts: training documents (whole documents; no special token text inside).
        vocab_size: final vocabulary size including the 256 byte symbols and the special tokens.
        min_frequency: a pair must occur this often to be merged.
    Returns:
        The trained :class:`Tokenizer` (not yet saved; ``tok.backend.save(path)`` writes ``tokenizer.json``).
    Raises:
        ValueError: ``vocab_size`` below :data:`MIN_VOCAB_SIZE` (no room for the byte alphabet).
    """
    _check_vocab_size(vocab_size)
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend)
