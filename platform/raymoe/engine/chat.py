"""Chat template: the files an export needs for transformers' tokenizer, and the server's renderer of the same template.

An export (training's ``export_hf``, :func:`raymoe.engine.tiny.build_tiny_checkpoint`) holds ``tokenizer.json`` and,
written by :func:`write_tokenizer_files`:

* ``tokenizer_config.json``: ``tokenizer_class`` (``PreTrainedTokenizerFast``), the special tokens (``bos_token`` and
  ``eos_token`` = the end-of-text token, which also starts nothing: our models use no BOS; ``pad_token``),
  ``model_max_length`` and ``chat_template`` (:data:`CHAT_TEMPLATE`), so
  ``AutoTokenizer.from_pretrained(export).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``
  works offline;
* ``generation_config.json``: ``eos_token_id`` / ``pad_token_id`` (/ ``bos_token_id``), so transformers'
  ``generate`` and our engine stop on the same token.

The server renders chat prompts with :class:`ChatTemplate`: the export's ``chat_template`` in a sandboxed jinja2
environment configured as transformers configures its own (``ImmutableSandboxedEnvironment``, ``trim_blocks``,
``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``, ``strftime_now`` and a ``tojson`` filter; the
special tokens as variables), so both render the same string; exports without a template fall back to
:data:`CHAT_TEMPLATE`.

The built-in template is ChatML; the markers are ordinary text for our byte-level tokenizer (no special ids)::

    <|im_start|>system\\n{content}<|im_end|>\\n        (one block per message; "developer" renders as "system")
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n                           (add_generation_prompt)

``<|im_end|>`` (:data:`CHAT_STOP`) is a stop string of chat requests whenever the template contains it.
"""
from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any, Optional

from raymoe.jsonfile import load_object

__all__ = ["CHAT_TEMPLATE", "CHAT_STOP", "ChatTemplate", "write_tokenizer_files"]

CHAT_STOP = "<|im_end|>"
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'developer'] -%}"
    "{{- raise_exception('message roles must be system, developer, user or assistant, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + ('system' if message['role'] == 'developer' else message['role']) + '\\n'"
    " + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class ChatTemplate:
    """A jinja2 chat template rendered as transformers renders it (module docstring).

    Example::

        >>> ChatTemplate().render([{"role": "user", "content": "Hi"}])
        '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """

    def __init__(self, source: str = CHAT_TEMPLATE, special_tokens: Optional[dict[str, str]] = None) -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators=None,
                   sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt: str) -> str:
            return datetime.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        self.source = source
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"chat_template is not a valid jinja2 template: {e} (line {e.lineno})") from None
        self.special_tokens = dict(special_tokens or {})
        self.stop = [CHAT_STOP] if CHAT_STOP in source else []

    @classmethod
    def from_dir(cls, path: Optional[str | pathlib.Path]) -> "ChatTemplate":
        """The ``chat_template`` of ``path/tokenizer_config.json`` (``path`` a directory, or a file in it), or the
        built-in one when there is none."""
        if path is None:
            return cls()
        p = pathlib.Path(path)
        f = (p if p.is_dir() else p.parent) / "tokenizer_config.json"
        if not f.exists():
            return cls()
        cfg = load_object(f.read_bytes(), str(f))
        src = cfg.get("chat_template")
        if isinstance(src, list):  # transformers' named templates: [{"name": ..., "template": ...}]
            src = next((t.get("template") for t in src if t.get("name") == "default"), None)
        specials = {k: _token_text(cfg.get(k)) for k in _SPECIAL_KEYS if _token_text(cfg.get(k)) is not None}
        return cls(src, specials) if isinstance(src, str) and src else cls(special_tokens=specials)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Messages (``role``, ``content`` strings) → prompt text. Raises ``ValueError`` for what the template
        refuses (``raise_exception``) or cannot render."""
        import jinja2

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens, **kwargs)
        except (jinja2.exceptions.TemplateError, TypeError) as e:
            raise ValueError(f"the chat template cannot render these messages: {e}") from None


def _token_text(v: Any) -> Optional[str]:
    if isinstance(v, dict):  # an AddedToken as transformers serialises it
        v = v.get("content")
    return v if isinstance(v, str) else None


def write_tokenizer_files(d: str | pathlib.Path, eos_token_id: Optional[int], pad_token_id: Optional[int] = None,
                          model_max_length: Optional[int] = None,
                          chat_template: str = CHAT_TEMPLATE) -> list[pathlib.Path]:
    """Write ``tokenizer_config.json`` and ``generation_config.json`` next to ``d/tokenizer.json`` (module
    docstring). The special tokens' text comes from ``tokenizer.json``; without it only ``generation_config.json``
    is written. Returns the files written."""
    d = pathlib.Path(d)
    written = []
    gen: dict[str, Any] = {"_from_model_config": False}
    if eos_token_id is not None:
        gen.update(bos_token_id=int(eos_token_id), eos_token_id=int(eos_token_id),
                   pad_token_id=int(eos_token_id if pad_token_id is None else pad_token_id))
    (d / "generation_config.json").write_text(json.dumps(gen, indent=2))
    written.append(d / "generation_config.json")
    tj = d / "tokenizer.json"
    if not tj.exists():
        return written
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(tj))

    def text(i: Optional[int]) -> Optional[str]:
        return None if i is None else tok.id_to_token(int(i))

    eos = text(eos_token_id)
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos, "eos_token": eos,
        "pad_token": text(pad_token_id if pad_token_id is not None else eos_token_id),
        "unk_token": None,
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }
    if model_max_length is not None:
        cfg["model_max_length"] = int(model_max_length)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    written.append(d / "tokenizer_config.json")
    return written
