"""OpenAI wire format: request parsing/validation, the chat template, response and SSE chunk builders (no Ray).

Chat template (ChatML style; the tokenizer needs no special tokens for it, the markers are ordinary text)::

    <|im_start|>system\\n{content}<|im_end|>\\n        (one block per message, roles system/user/assistant)
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n                           (generation prompt)

``<|im_end|>`` is always a stop string of chat requests. Extensions beyond OpenAI's fields: ``top_k``,
``stop_token_ids``, ``ignore_eos``.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Optional

from raymoe.engine.sampling import MAX_LOGPROBS, SamplingParams

__all__ = ["APIError", "parse_completion", "echo_options", "parse_chat", "render_chat", "CHAT_STOP", "error_body", "usage",
           "completion_response", "chat_response", "completion_chunk", "chat_chunk", "usage_chunk"]

CHAT_STOP = "<|im_end|>"
_IGNORED = {"model", "user", "stream", "stream_options", "suffix", "best_of", "echo", "presence_penalty",
            "frequency_penalty", "logit_bias", "response_format", "tools", "tool_choice", "parallel_tool_calls",
            "max_completion_tokens", "messages", "prompt", "store", "metadata", "service_tier"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _bad(msg: str, param: Optional[str] = None) -> APIError:
    return APIError(400, msg, param=param)


def _num(body: dict, key: str, default: Any, kind: type) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if kind is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _bad(f"'{key}' must be an integer", key)
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"'{key}' must be a number", key)
    return float(v)


def _sampling(body: dict, logprobs: Optional[int], extra_stop: Optional[str] = None) -> SamplingParams:
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _bad("'stop' must be a string or a list of strings", "stop")
    if extra_stop:
        stop = list(stop) + [extra_stop]
    stop_ids = body.get("stop_token_ids") or []
    if not (isinstance(stop_ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids)):
        raise _bad("'stop_token_ids' must be a list of integers", "stop_token_ids")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("'seed' must be an integer", "seed")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    sp = SamplingParams(
        max_tokens=16 if max_tokens is None else max_tokens,
        temperature=_num(body, "temperature", 1.0, float),
        top_p=_num(body, "top_p", 1.0, float),
        top_k=_num(body, "top_k", 0, int),
        n=_num(body, "n", 1, int),
        seed=seed,
        stop=stop,
        stop_token_ids=stop_ids,
        ignore_eos=bool(body.get("ignore_eos", False)),
        logprobs=logprobs,
    )
    try:
        sp.validate()
    except ValueError as e:
        raise _bad(str(e), getattr(e, "param", None)) from None
    if any(len(s) > 64 for s in sp.stop):
        raise _bad("stop strings are limited to 64 characters", "stop")
    return sp


def _check_stream(body: dict) -> bool:
    s = body.get("stream", False)
    if not isinstance(s, bool):
        raise _bad("'stream' must be a boolean", "stream")
    return s


def parse_completion(body: Any) -> tuple[str | list[int], SamplingParams, bool]:
    """``/v1/completions`` body → (prompt, sampling params, stream)."""
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    if "prompt" not in body:
        raise _bad("'prompt' is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("'prompt' must not be empty", "prompt")
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        pass
    elif isinstance(prompt, list) and prompt and all(isinstance(t, (str, list)) for t in prompt):
        raise _bad("only one prompt per request is supported", "prompt")
    else:
        raise _bad("'prompt' must be a non-empty string or a list of token ids", "prompt")
    lp = body.get("logprobs")
    if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS):
        raise _bad(f"'logprobs' must be an integer in [0, {MAX_LOGPROBS}]", "logprobs")
    if body.get("echo"):
        raise _bad("'echo' is not supported", "echo")
    return prompt, _sampling(body, lp), _check_stream(body)


def echo_options(body: Any) -> tuple[Any, bool, bool]:
    """``/v1/completions`` ``echo``: ``(body without it, echo, score_only)``. With ``echo`` the response text starts
    with the prompt and, with ``logprobs``, the logprob lists cover the prompt's tokens too (the first one ``None``);
    ``max_tokens: 0`` (``score_only``) scores the prompt and generates nothing — lm-evaluation-harness'
    loglikelihood requests. One prompt, one choice, no streaming."""
    if not isinstance(body, dict) or not body.get("echo"):
        return body, False, False
    if not isinstance(body["echo"], bool):
        raise _bad("'echo' must be a boolean", "echo")
    if body.get("stream"):
        raise _bad("'echo' is not supported with 'stream'", "echo")
    if body.get("n", 1) != 1:
        raise _bad("'echo' needs n=1", "n")
    body = {k: v for k, v in body.items() if k != "echo"}
    score_only = body.get("max_tokens") == 0
    if score_only:
        body["max_tokens"] = 1  # parsed as a one-token request; nothing is generated
    return body, True, score_only


def render_chat(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise _bad(f"messages[{i}] must have a role of system, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            parts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise _bad(f"messages[{i}]: only text content parts are supported", "messages")
                parts.append(p["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append(f"<|im_start|>{role}\n{content}{CHAT_STOP}\n")
    out.append("<|im_start|>assistant\n")
    return "".join(out)


def parse_chat(body: Any) -> tuple[str, SamplingParams, bool]:
    """``/v1/chat/completions`` body → (rendered prompt, sampling params, stream)."""
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    if "messages" not in body:
        raise _bad("'messages' is required", "messages")
    prompt = render_chat(body["messages"])
    lp = None
    if body.get("logprobs"):
        top = body.get("top_logprobs") or 0
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS:
            raise _bad(f"'top_logprobs' must be an integer in [0, {MAX_LOGPROBS}]", "top_logprobs")
        lp = top
    return prompt, _sampling(body, lp, extra_stop=CHAT_STOP), _check_stream(body)


# ---------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries: list[dict], decode, offset0: int = 0) -> dict[str, Any]:
    tokens = [decode([e["token_id"]]) for e in entries]
    offsets, off = [], offset0
    for t in tokens:
        offsets.append(off)
        off += len(t)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["top"] is None else {decode([i]): lp for i, lp in e["top"]} for e in entries],
            "text_offset": offsets}


def chat_logprobs(entries: list[dict], decode) -> dict[str, Any]:
    def item(i: int, lp: float) -> dict[str, Any]:
        s = decode([i])
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {"content": [{**item(e["token_id"], e["logprob"]), "top_logprobs": [item(i, lp) for i, lp in e["top"]]}
                        for e in entries]}


def completion_response(rid: str, model: str, choices: list[dict], use: dict) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chat_response(rid: str, model: str, choices: list[dict], use: dict) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def completion_chunk(rid: str, model: str, index: int, text: str, finish_reason: Optional[str],
                     logprobs: Optional[dict] = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish_reason: Optional[str],
               logprobs: Optional[dict] = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": use}
