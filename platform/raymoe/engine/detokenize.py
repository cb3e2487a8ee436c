"""Incremental detokenization: each engine step decodes only a short window of a sequence's newest tokens.

Decoding the whole output every step costs ``O(len)`` per step, ``O(len²)`` per sequence, on the one thread every
request of a replica shares. Instead (the scheme vLLM uses) a sequence keeps its committed text and two offsets into
its token ids: ``prefix`` (where the last decoded window started) and ``read`` (the end of the committed tokens).
When tokens arrive, ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])`` is the new text; it is
committed (``prefix ← read``, ``read ← len``) unless it ends in U+FFFD — a multi-byte character whose remaining
bytes come with the next tokens. Decoding from ``prefix`` rather than ``read`` gives the decoder the previous
window as context, so decoders whose output depends on the preceding token see it.

With a byte-level BPE (what raymoe trains), ``committed + tail`` equals ``decode(all ids)``: the window always starts
on a character boundary. A run of bytes that never completes a character (``MAX_PENDING`` tokens, more than a 4-byte
UTF-8 character can take) is committed as the decoder rendered it, so the window stays bounded.
"""
from __future__ import annotations

from typing import Any, Sequence

__all__ = ["IncrementalDetokenizer", "MAX_PENDING"]

MAX_PENDING = 8  # tokens held back waiting for the rest of a character (a UTF-8 character has at most 4 bytes)


class IncrementalDetokenizer:
    """Text of a growing token sequence, decoding ``O(window)`` tokens per :meth:`add`.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (``decode(ids, skip_special_tokens=...)``).
        skip_special_tokens: passed to every decode.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.committed = ""
        self.tail = ""  # decoded text of ids[read:] as it renders now (may end in U+FFFD)
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens) if ids else ""

    def add(self, new_ids: Sequence[int]) -> None:
        """Append tokens and update :attr:`text`."""
        if not new_ids:
            return
        self.ids.extend(int(t) for t in new_ids)
        prefix_text = self._decode(self.ids[self.prefix : self.read])
        full = self._decode(self.ids[self.prefix :])
        new = full[len(prefix_text):]
        if new.endswith("\ufffd") and len(self.ids) - self.read < MAX_PENDING:
            self.tail = new  # an incomplete character: keep decoding the window until it completes
            return
        self.committed += new
        self.tail = ""
        self.prefix, self.read = self.read, len(self.ids)

    @property
    def text(self) -> str:
        """Everything decoded so far (what ``decode(ids)`` returns, U+FFFD for a trailing incomplete character)."""
        return self.committed + self.tail
