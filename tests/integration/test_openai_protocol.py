"""OpenAI request parsing (:mod:`raymoe.actors.serve.protocol`, no Ray started; it lives in the Ray package): strict
types, OpenAI-shaped 400s naming the field, unknown fields warned about once per name, stop limits with chat's end
marker, the refused features, defaults (chat max_tokens = rest of the context, completions 16), include_usage."""
from __future__ import annotations

import logging

import pytest

from raymoe.actors.serve import protocol as P
from raymoe.engine.chat import CHAT_STOP

MSG = [{"role": "user", "content": "hi"}]


def refused(body: dict, param: str, match: str = "") -> P.APIError:
    parse = P.parse_chat if "messages" in body else P.parse_completion
    with pytest.raises(P.APIError) as e:
        parse(body)
    err = e.value
    assert err.status == 400 and err.param == param and match in err.message, (body, err.param, err.message)
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    return err


def test_strict_types_are_refused_not_coerced() -> None:
    for key, val in (("ignore_eos", "false"), ("ignore_eos", 0), ("stream", "true"), ("max_tokens", "5"),
                     ("max_tokens", 5.0), ("temperature", "0.5"), ("n", True), ("seed", 1.5), ("top_k", "3"),
                     ("skip_special_tokens", "no"), ("min_tokens", -1), ("stop_token_ids", ["1"])):
        refused({"prompt": "x", key: val}, key)
    refused({"messages": MSG, "logprobs": "true"}, "logprobs")
    refused({"messages": [{"role": "user", "content": 5}]}, "messages", "messages.0.content")
    refused({"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options")
    refused({"prompt": 1.5}, "prompt")
    refused({"max_tokens": 3}, "prompt", "Field required")
    # a bool is never an int (pydantic strict), and ints are fine where floats are expected
    assert P.parse_completion({"prompt": "x", "ignore_eos": False, "temperature": 1}).params.ignore_eos is False
    assert P.parse_completion({"prompt": "x", "ignore_eos": True}).params.ignore_eos is True


def test_stop_limits_and_chat_end_marker() -> None:
    stops = [f"s{i}" for i in range(P.MAX_STOP_STRINGS)]
    r = P.parse_chat({"messages": MSG, "stop": stops})
    assert r.params.stop == stops + [CHAT_STOP]  # 8 of the user's plus the marker (was refused: 9 > 8)
    refused({"messages": MSG, "stop": stops + ["one more"]}, "stop", "at most 8")
    refused({"prompt": "x", "stop": ["a" * 65]}, "stop", "64")
    refused({"prompt": "x", "stop": ""}, "stop")
    refused({"prompt": "x", "stop_token_ids": list(range(65))}, "stop_token_ids")


def test_sampling_fields_reach_the_params() -> None:
    r = P.parse_completion({"prompt": [1, 2, 3], "presence_penalty": 0.5, "frequency_penalty": -0.25,
                            "repetition_penalty": 1.2, "min_p": 0.1, "logit_bias": {"7": 5, "9": -100},
                            "min_tokens": 4, "max_tokens": 9, "top_k": -1})
    sp = r.params
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty, sp.min_p, sp.min_tokens) == \
        (0.5, -0.25, 1.2, 0.1, 4)
    assert sp.logit_bias == {7: 5.0, 9: -100.0} and sp.max_tokens == 9 and sp.top_k == 0 and r.prompt == [1, 2, 3]
    refused({"prompt": "x", "logit_bias": {"x7": 1}}, "logit_bias", "token ids")
    refused({"prompt": "x", "logit_bias": {"7": 101}}, "logit_bias", "[-100, 100]")
    refused({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty")
    refused({"prompt": "x", "min_p": -0.1}, "min_p")
    refused({"prompt": "x", "min_tokens": 20, "max_tokens": 10}, "min_tokens")


def test_defaults_usage_and_refused_features() -> None:
    assert P.parse_completion({"prompt": "x"}).params.max_tokens == 16
    chat = P.parse_chat({"messages": MSG})
    assert chat.params.max_tokens is None and chat.include_usage is False and chat.stream is False
    assert P.parse_chat({"messages": MSG, "max_completion_tokens": 7}).params.max_tokens == 7
    r = P.parse_chat({"messages": MSG, "stream": True, "stream_options": {"include_usage": True}})
    assert r.include_usage is True and r.stream is True
    refused({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream is true")
    assert P.parse_chat({"messages": MSG, "response_format": {"type": "text"}}).params.max_tokens is None
    refused({"messages": MSG, "response_format": {"type": "json_object"}}, "response_format", "not supported")
    refused({"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {}}}, "response_format")
    refused({"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")
    refused({"messages": MSG, "tool_choice": "auto"}, "tool_choice")
    assert P.parse_chat({"messages": MSG, "tool_choice": "none", "tools": []}).prompt
    refused({"messages": [{"role": "tool", "content": "x"}]}, "messages", "tools are not supported")
    refused({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages",
            "only text content parts")
    refused({"messages": []}, "messages")
    refused({"messages": MSG, "top_logprobs": 2}, "top_logprobs", "logprobs")
    refused({"prompt": "x", "echo": True}, "echo")
    refused({"prompt": "x", "suffix": "y"}, "suffix")
    refused({"prompt": "x", "best_of": 3}, "best_of")
    refused({"prompt": ["a", "b"]}, "prompt", "one prompt")
    parts = P.parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "h"},
                                                                   {"type": "text", "text": "i"}]}]})
    assert parts.prompt == P.parse_chat({"messages": MSG}).prompt
    no_gen = P.parse_chat({"messages": MSG, "add_generation_prompt": False}).prompt
    assert no_gen + "<|im_start|>assistant\n" == P.parse_chat({"messages": MSG}).prompt


def test_unknown_fields_accepted_and_warned_once(caplog) -> None:
    warn = P.UnknownFields()
    with caplog.at_level(logging.WARNING, logger=P.log.name):
        for _ in range(3):
            r = P.parse_completion({"prompt": "x", "frobnicate": 1, "guided_json": {}})
            assert warn(r.request) == ["frobnicate", "guided_json"]
        warn(P.parse_completion({"prompt": "x", "frobnicate": 2, "other": 3}).request)
    msgs = [rec.getMessage() for rec in caplog.records]
    assert len(msgs) == 2 and "frobnicate" in msgs[0] and "guided_json" in msgs[0] and "'other'" in msgs[1]
    assert "frobnicate" not in msgs[1]
    # known OpenAI fields without effect are not "unknown"
    assert warn(P.parse_chat({"messages": MSG, "user": "u", "store": False, "metadata": {},
                              "parallel_tool_calls": True}).request) == []
