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

import functools
import json
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

    def __init__(self, backend: tokenizers.Tokenizer, path: pathlib.Path | None = None, *,
                 eod_token: str = EOD_TOKEN, pad_token: str | None = PAD_TOKEN, bos_token: str | None = None,
                 chat_template: str | None = None) -> None:
        self.backend = backend
        self.path = path
        self.chat_template = chat_template
        self.eod_token, self.pad_token, self.bos_token = eod_token, pad_token, bos_token
        eod = backend.token_to_id(eod_token)
        pad = backend.token_to_id(pad_token) if pad_token is not None else eod
        if eod is None or pad is None:
            raise ValueError(f"tokenizer lacks the special tokens {[eod_token, pad_token]} (not built by raymoe.data?)")
        self.eod_id: int = eod
        self.pad_id: int = pad
        self.bos_id: int | None = None
        if bos_token is not None:
            bos = backend.token_to_id(bos_token)
            if bos is None:
                raise ValueError(f"tokenizer config names bos_token {bos_token!r} but {path} has no such token")
            self.bos_id = bos

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> "Tokenizer":
        """A ``tokenizer.json`` trained by :func:`train_tokenizer` (specials ``<|endoftext|>``, ``<|pad|>``)."""
        path = pathlib.Path(path)
        return cls(tokenizers.Tokenizer.from_file(str(path)), path)

    @classmethod
    def from_pretrained(cls, directory: str | pathlib.Path) -> "Tokenizer":
        """An HF tokenizer directory: ``tokenizer.json`` plus ``tokenizer_config.json`` naming the special tokens.

        ``eos_token`` (required) is the end-of-document token that joins documents; ``bos_token`` (optional) is put
        before every document when it differs from ``eos_token``; ``pad_token`` defaults to ``eos_token``.
        """
        d = pathlib.Path(directory)
        tok_file, cfg_file = d / "tokenizer.json", d / "tokenizer_config.json"
        missing = [f.name for f in (tok_file, cfg_file) if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"HF tokenizer directory {d} lacks {missing}: data.tokenizer needs tokenizer.json "
                                    f"and tokenizer_config.json (what save_pretrained writes)")
        cfg = json.loads(cfg_file.read_text())

        def special(key: str) -> str | None:
            v = cfg.get(key)
            return v.get("content") if isinstance(v, dict) else v

        eos = special("eos_token")
        if not eos:
            raise ValueError(f"{cfg_file} names no eos_token: raymoe joins documents with it, so it is required")
        bos = special("bos_token")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (d / "chat_template.jinja").is_file():  # where newer transformers save it
            template = (d / "chat_template.jinja").read_text()
        return cls(tokenizers.Tokenizer.from_file(str(tok_file)), tok_file, eod_token=eos,
                   pad_token=special("pad_token") or eos, bos_token=bos if bos and bos != eos else None,
                   chat_template=template)

    def document(self, text: str) -> list[int]:
        """One document's ids as they enter the stream: ``[bos] + encode(text) + [eod]`` (bos only if set)."""
        head = [self.bos_id] if self.bos_id is not None else []
        return head + self.encode(text) + [self.eod_id]

    def special_ids(self) -> dict[str, int | None]:
        """``{"bos_token_id", "eos_token_id", "pad_token_id"}`` as HF configs name them."""
        return {"bos_token_id": self.bos_id if self.bos_id is not None else self.eod_id,
                "eos_token_id": self.eod_id, "pad_token_id": self.pad_id}

    def spec(self) -> dict[str, str | None]:
        """Everything needed to rebuild this tokenizer in another process (plain strings: cheap to ship to Ray)."""
        return {"json": self.backend.to_str(), "eod_token": self.eod_token, "pad_token": self.pad_token,
                "bos_token": self.bos_token, "chat_template": self.chat_template}

    @classmethod
    def from_spec(cls, spec: dict[str, str | None]) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_str(spec["json"]), eod_token=spec["eod_token"],
                   pad_token=spec["pad_token"], bos_token=spec["bos_token"], chat_template=spec.get("chat_template"))

    def render_chat(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """A conversation → ``(ids, mask)`` through the tokenizer's chat template; ``mask[t] = 1`` on the tokens of
        assistant turns (what the loss trains on), 0 elsewhere.

        The template is rendered for growing prefixes of the conversation: before each assistant turn with
        ``add_generation_prompt=True`` (the prompt a server would send), after it without. Each render must extend
        the previous one; the text is cut at those points and each piece tokenized on its own, so the prompt tokens
        are exactly those a server tokenizes at inference and the assistant tokens follow them.
        """
        if not self.chat_template:
            raise ValueError(f"tokenizer {self.path} has no chat_template (tokenizer_config.json 'chat_template' or "
                             f"chat_template.jinja): chat data (a 'messages' column) needs one")
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError("a chat document must be a non-empty list of {'role', 'content'} messages")
        render = _template(self.chat_template)
        specials = {"bos_token": self.bos_token or "", "eos_token": self.eod_token}
        pieces: list[tuple[str, int]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = render(messages=list(messages[:i]), add_generation_prompt=True, **specials)
            full = render(messages=list(messages[: i + 1]), add_generation_prompt=False, **specials)
            if not head.startswith(done) or not full.startswith(head):
                raise ValueError("the chat template does not render a conversation as a growing prefix; raymoe cuts "
                                 "the text at each assistant turn to mask the loss and needs that property")
            pieces += [(head[len(done):], 0), (full[len(head):], 1)]
            done = full
        end = render(messages=list(messages), add_generation_prompt=False, **specials)
        if not end.startswith(done):
            raise ValueError("the chat template does not render a conversation as a growing prefix")
        pieces.append((end[len(done):], 0))
        ids: list[int] = []
        mask: list[int] = []
        for text, train in pieces:
            if text:
                t = self.encode(text)
                ids += t
                mask += [train] * len(t)
        return ids, mask

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


@functools.lru_cache(maxsize=8)
def _template(source: str):
    """A compiled chat template (HF's Jinja conventions: sandboxed, trim_blocks, lstrip_blocks, ``raise_exception``,
    ``tojson``)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(source).render
    except jinja2.TemplateError as e:
        raise ValueError(f"the tokenizer's chat_template does not compile: {e}") from e


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
