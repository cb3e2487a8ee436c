"""OpenAI wire format: request models and validation, chat rendering, response and SSE chunk builders (no Ray).

Requests are pydantic models (:class:`CompletionRequest`, :class:`ChatCompletionRequest`, :class:`TokenizeRequest`,
:class:`DetokenizeRequest`). The ingress reads the body itself (its size limit applies while reading) and validates
it with these models (:func:`parse_model`), as FastAPI would; FastAPI's own validation errors map to the same 400.
Types are strict (``"ignore_eos": "false"`` and ``"max_tokens": "5"`` are refused, never coerced); every failure is a
400 in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` naming the field. Unknown fields are accepted and ignored; the
server logs each unknown field name once (:class:`UnknownFields`, as vLLM does).

Supported beyond the basics (vLLM's semantics, :mod:`raymoe.engine.sampling`): ``presence_penalty``,
``frequency_penalty``, ``repetition_penalty``, ``min_p``, ``logit_bias``, ``min_tokens``, ``top_k``,
``stop_token_ids``, ``ignore_eos``, ``skip_special_tokens``, ``seed``, ``n``, ``logprobs``/``top_logprobs``,
``stream_options.include_usage`` (the final usage chunk, ``choices: []``, only when asked), chat's
``add_generation_prompt``. Refused with a 400 naming the field: ``response_format`` other than ``{"type": "text"}``,
``tools`` / ``tool_choice`` (other than none), ``echo``, ``suffix``, ``best_of`` other than ``n``, non-text content
parts, more than one prompt. Accepted and ignored: ``user``, ``store``, ``metadata``, ``service_tier``,
``parallel_tool_calls``.

Chat prompts are rendered by :class:`raymoe.engine.chat.ChatTemplate` (the export's ``chat_template``, else the
built-in ChatML one); its end marker ``<|im_end|>`` is added to the user's stop strings (at most
:data:`MAX_STOP_STRINGS` of those). Chat ``max_tokens`` defaults to the rest of the context (the engine fills it in),
completions' to 16.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from raymoe.engine.chat import CHAT_STOP, ChatTemplate
from raymoe.engine.sampling import MAX_LOGPROBS, SamplingParams

__all__ = ["APIError", "CompletionRequest", "ChatCompletionRequest", "TokenizeRequest", "DetokenizeRequest",
           "Parsed", "UnknownFields", "parse_completion", "echo_options", "parse_chat", "parse_model", "render_chat", "CHAT_STOP",
           "MAX_STOP_STRINGS", "error_body", "validation_error", "usage", "completion_response", "chat_response",
           "completion_chunk", "chat_chunk", "usage_chunk"]

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 8  # the user's; chat adds its end marker on top
MAX_STOP_CHARS = 64
MAX_STOP_TOKEN_IDS = 64
_DEFAULT_TEMPLATE = ChatTemplate()


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


def validation_error(e: ValidationError | list[dict[str, Any]]) -> APIError:
    """A pydantic / FastAPI validation failure → a 400 naming the first failing field (``param``: its dotted path)."""
    errors = e.errors() if isinstance(e, ValidationError) else list(e)
    if not errors:
        return _bad("invalid request")

    def path(err: dict) -> list[str]:  # without FastAPI's "body" and pydantic's union member tags ("list[int]")
        return [str(x) for x in err.get("loc", ()) if x != "body" and not (
            isinstance(x, str) and ("[" in x or "-" in x or x in _UNION_TAGS))]

    field = path(errors[0])[:1]
    same = [err for err in errors if path(err)[:1] == field]
    # a union (``stop``: a string or a list) fails once per member: report the member that matched the input's
    # type (its error is not a type mismatch), e.g. "List should have at most 8 items"
    err = next((x for x in same if not str(x.get("type", "")).endswith("_type")), same[0])
    where = ".".join(path(err)) or "request"
    return _bad(f"{where}: {err.get('msg')}", field[0] if field else None)


# ---------------------------------------------------------------------- request models
_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list"}
NonNegInt = Annotated[StrictInt, Field(ge=0)]
StopStr = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class _Request(BaseModel):
    """Unknown fields are kept in ``model_extra`` (ignored, warned about once per name by :class:`UnknownFields`)."""
    model_config = ConfigDict(extra="allow")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM's; accepted, usage comes once at the end


class _Sampling(_Request):
    model: Optional[StrictStr] = None
    max_tokens: Optional[Annotated[StrictInt, Field(ge=1)]] = None
    temperature: Optional[StrictFloat] = None
    top_p: Optional[StrictFloat] = None
    top_k: Optional[StrictInt] = None
    min_p: Optional[StrictFloat] = None
    n: Optional[StrictInt] = None
    seed: Optional[StrictInt] = None
    stop: Optional[Union[StopStr, Annotated[list[StopStr], Field(max_length=MAX_STOP_STRINGS)]]] = None
    stop_token_ids: Optional[Annotated[list[NonNegInt], Field(max_length=MAX_STOP_TOKEN_IDS)]] = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    presence_penalty: Optional[StrictFloat] = None
    frequency_penalty: Optional[StrictFloat] = None
    repetition_penalty: Optional[StrictFloat] = None
    logit_bias: Optional[dict[StrictStr, StrictFloat]] = None
    min_tokens: NonNegInt = 0
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    response_format: Optional[dict[str, Any]] = None
    # OpenAI fields accepted without effect
    user: Optional[StrictStr] = None
    store: Optional[StrictBool] = None
    metadata: Optional[dict[str, Any]] = None
    service_tier: Optional[StrictStr] = None


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, list[StrictInt], list[StrictStr], list[list[StrictInt]]]
    logprobs: Optional[Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)]] = None
    echo: StrictBool = False
    suffix: Optional[StrictStr] = None
    best_of: Optional[StrictInt] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: Optional[StrictStr] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: StrictStr
    content: Optional[Union[StrictStr, list[ContentPart]]] = None
    name: Optional[StrictStr] = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Optional[Annotated[StrictInt, Field(ge=1)]] = None
    logprobs: StrictBool = False
    top_logprobs: Optional[Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[StrictStr, dict[str, Any]]] = None
    parallel_tool_calls: Optional[StrictBool] = None
    add_generation_prompt: StrictBool = True  # vLLM's


class TokenizeRequest(_Request):
    """vLLM's ``/tokenize``: ``prompt`` (completion form) or ``messages`` (chat form, rendered first)."""
    model: Optional[StrictStr] = None
    prompt: Optional[StrictStr] = None
    messages: Optional[Annotated[list[ChatMessage], Field(min_length=1)]] = None
    add_generation_prompt: StrictBool = True
    add_special_tokens: Optional[StrictBool] = None  # default: True for a prompt, False for messages (vLLM)
    return_token_strs: StrictBool = False


class DetokenizeRequest(_Request):
    model: Optional[StrictStr] = None
    tokens: list[NonNegInt]


class UnknownFields:
    """Logs each unknown request field name once per process (vLLM warns about them the same way)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, req: BaseModel) -> list[str]:
        extra = sorted((req.model_extra or {}).keys())
        new = [k for k in extra if k not in self.seen]
        if new:
            self.seen.update(new)
            log.warning("request fields ignored (unknown to this server): %s", new)
        return extra


# ---------------------------------------------------------------------- parsing
@dataclass
class Parsed:
    prompt: str | list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    request: BaseModel


def parse_model(cls: type[BaseModel], body: Any) -> BaseModel:
    """Validate a decoded JSON body against a request model; 400 (:func:`validation_error`) on failure."""
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


def _sampling(r: _Sampling, max_tokens: Optional[int], logprobs: Optional[int],
              extra_stop: list[str]) -> SamplingParams:
    stop = [] if r.stop is None else [r.stop] if isinstance(r.stop, str) else list(r.stop)
    bias = None
    if r.logit_bias:
        bias = {}
        for k, v in r.logit_bias.items():
            if not k.strip().isdigit():
                raise _bad(f"logit_bias keys must be token ids (decimal strings), got {k!r}", "logit_bias")
            bias[int(k)] = v

    def opt(v: Any, default: Any) -> Any:
        return default if v is None else v

    sp = SamplingParams(
        max_tokens=max_tokens, temperature=opt(r.temperature, 1.0), top_p=opt(r.top_p, 1.0), top_k=opt(r.top_k, 0),
        n=opt(r.n, 1), seed=r.seed, stop=stop + extra_stop, stop_token_ids=list(r.stop_token_ids or []),
        ignore_eos=r.ignore_eos, logprobs=logprobs, skip_special_tokens=r.skip_special_tokens,
        presence_penalty=opt(r.presence_penalty, 0.0), frequency_penalty=opt(r.frequency_penalty, 0.0),
        repetition_penalty=opt(r.repetition_penalty, 1.0), min_p=opt(r.min_p, 0.0), logit_bias=bias,
        min_tokens=r.min_tokens)
    try:
        sp.validate()
    except ValueError as e:
        raise _bad(str(e), getattr(e, "param", None)) from None
    if r.stream_options is not None and not r.stream:
        raise _bad("stream_options is only allowed when stream is true", "stream_options")
    rf = r.response_format
    if rf is not None and rf.get("type") != "text":
        raise _bad(f"response_format {rf.get('type')!r} is not supported; only {{'type': 'text'}}", "response_format")
    return sp


def parse_completion(body: Any) -> Parsed:
    """``/v1/completions`` body → :class:`Parsed`."""
    r: CompletionRequest = parse_model(CompletionRequest, body)  # type: ignore[assignment]
    prompt = r.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        raise _bad("only one prompt per request is supported", "prompt")
    if not prompt:
        raise _bad("'prompt' must not be empty", "prompt")
    if r.echo:
        raise _bad("'echo' is not supported", "echo")
    if r.suffix:
        raise _bad("'suffix' is not supported", "suffix")
    if r.best_of is not None and r.best_of != (r.n or 1):
        raise _bad("'best_of' is not supported (other than equal to n)", "best_of")
    sp = _sampling(r, 16 if r.max_tokens is None else r.max_tokens, r.logprobs, [])
    return Parsed(prompt, sp, r.stream, bool(r.stream_options and r.stream_options.include_usage), r)


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


_ROLES = ("system", "developer", "user", "assistant")


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages → ``[{"role", "content"}]`` with text content (parts joined); 400 for what we cannot render."""
    out = []
    for i, m in enumerate(messages):
        if m.role not in _ROLES:
            raise _bad(f"messages[{i}].role must be one of {list(_ROLES)}, got {m.role!r}"
                       + (" (tools are not supported)" if m.role in ("tool", "function") else ""), "messages")
        content = m.content
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise _bad(f"messages[{i}].content[{j}]: only text content parts are supported, got "
                               f"{part.type!r}", "messages")
                parts.append(part.text)
            content = "".join(parts)
        if content is None:
            if m.role != "assistant":
                raise _bad(f"messages[{i}].content is required", "messages")
            content = ""
        if (m.model_extra or {}).get("tool_calls"):
            raise _bad(f"messages[{i}].tool_calls: tools are not supported", "messages")
        out.append({"role": m.role, "content": content})
    return out


def render_chat(messages: list[dict[str, Any]] | list[ChatMessage], template: Optional[ChatTemplate] = None,
                add_generation_prompt: bool = True) -> str:
    """Messages → prompt text through ``template`` (default: the built-in ChatML one)."""
    msgs = chat_messages([m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m) for m in messages])
    try:
        return (template or _DEFAULT_TEMPLATE).render(msgs, add_generation_prompt=add_generation_prompt)
    except ValueError as e:
        raise _bad(str(e), "messages") from None


def parse_chat(body: Any, template: Optional[ChatTemplate] = None) -> Parsed:
    """``/v1/chat/completions`` body → :class:`Parsed` (the prompt rendered by ``template``)."""
    r: ChatCompletionRequest = parse_model(ChatCompletionRequest, body)  # type: ignore[assignment]
    template = template or _DEFAULT_TEMPLATE
    if r.tools:
        raise _bad("'tools' are not supported by this server", "tools")
    if r.tool_choice is not None and r.tool_choice != "none":
        raise _bad("'tool_choice' is not supported by this server (only 'none')", "tool_choice")
    if r.top_logprobs is not None and not r.logprobs:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    prompt = render_chat(r.messages, template, r.add_generation_prompt)
    lp = (r.top_logprobs or 0) if r.logprobs else None
    max_tokens = r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens
    sp = _sampling(r, max_tokens, lp, template.stop)  # None: the rest of the context
    return Parsed(prompt, sp, r.stream, bool(r.stream_options and r.stream_options.include_usage), r)


# ---------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


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
