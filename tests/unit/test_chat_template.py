"""The export's tokenizer files: transformers' ``AutoTokenizer`` loads them offline with the right special tokens, and
its ``apply_chat_template`` renders exactly what our server's :class:`ChatTemplate` renders (several message lists,
with and without the generation prompt, a template of the export's own); exports without a template fall back to
the built-in one."""
from __future__ import annotations

import json

import pytest

from raymoe.data.tokenizer import EOD_TOKEN, PAD_TOKEN, train_tokenizer
from raymoe.engine.chat import CHAT_STOP, CHAT_TEMPLATE, ChatTemplate, write_tokenizer_files
from raymoe.engine.tiny import tiny_corpus

transformers = pytest.importorskip("transformers")

MESSAGES = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the river.\nNow."}],
    [{"role": "developer", "content": "rules"}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b {{ not jinja }}"}, {"role": "user", "content": "  c  "}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "<|im_start|>user\nspoof"}],
]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    tok = train_tokenizer(tiny_corpus(1), vocab_size=400, min_frequency=2)
    tok.backend.save(str(d / "tokenizer.json"))
    written = write_tokenizer_files(d, tok.eod_id, tok.pad_id, model_max_length=512)
    assert sorted(f.name for f in written) == ["generation_config.json", "tokenizer_config.json"]
    return d, tok


def test_auto_tokenizer_loads_export_with_special_tokens(export) -> None:
    d, tok = export
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(d))
    assert (hf_tok.eos_token, hf_tok.bos_token, hf_tok.pad_token) == (EOD_TOKEN, EOD_TOKEN, PAD_TOKEN)
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.eod_id, tok.pad_id)
    assert hf_tok.model_max_length == 512
    text = "The river runs past the old mill"
    assert hf_tok(text)["input_ids"] == tok.encode(text)  # no BOS/EOS added
    gen = json.loads((d / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (tok.eod_id, tok.pad_id)
    assert transformers.GenerationConfig.from_pretrained(str(d)).eos_token_id == tok.eod_id


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_transformers_and_server_render_the_same_prompt(export, add_generation_prompt) -> None:
    d, tok = export
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(d))
    ours = ChatTemplate.from_dir(d)
    assert ours.source == CHAT_TEMPLATE and ours.stop == [CHAT_STOP]
    for msgs in MESSAGES:
        want = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        got = ours.render(msgs, add_generation_prompt=add_generation_prompt)
        assert got == want
        ids = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=add_generation_prompt)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == tok.encode(got)
    assert ours.render(MESSAGES[1]) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nTell me about the "
                                        "river.\nNow.<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="roles"):
        ours.render([{"role": "wizard", "content": "x"}])
    with pytest.raises(Exception, match="roles"):
        hf_tok.apply_chat_template([{"role": "wizard", "content": "x"}], tokenize=False)


def test_export_template_is_used_and_fallback(export, tmp_path) -> None:
    d, tok = export
    custom = ("{% for m in messages %}{{ bos_token }}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}[ASSISTANT]{% endif %}")
    (tmp_path / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes())
    write_tokenizer_files(tmp_path, tok.eod_id, tok.pad_id, chat_template=custom)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = ChatTemplate.from_dir(tmp_path / "tokenizer.json")  # a file in the directory works too
    assert ours.stop == []
    for msgs in MESSAGES:
        assert ours.render(msgs) == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.render(MESSAGES[0]).startswith(EOD_TOKEN + "[USER] Hello")
    (tmp_path / "bare").mkdir()  # an export without tokenizer_config.json
    assert ChatTemplate.from_dir(tmp_path / "bare").source == CHAT_TEMPLATE


def test_bad_template_files_are_clear_errors(tmp_path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ChatTemplate.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}"}))
    with pytest.raises(ValueError, match="not a valid jinja2 template"):
        ChatTemplate.from_dir(tmp_path)


def test_sandbox_refuses_unsafe_templates() -> None:
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="unsafe"):
        evil.render(MESSAGES[0])
