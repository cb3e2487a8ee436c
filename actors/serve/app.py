"""Ray Serve application: a FastAPI ingress (OpenAI API) in front of autoscaled engine replicas.

Deployments::

    HTTP ──► APIIngress (FastAPI; auth, validation, OpenAI JSON / SSE)
                 │  handle.options(stream=True).generate.remote(prompt, params)   (a stream of deltas)
                 ▼
             EngineDeployment × [min_replicas, max_replicas]   (autoscaled on ongoing requests)
                 one LLMEngine + one asyncio batching loop per replica
                 (+ with ``experts.backend=replicated``: in-process redundant expert shards whose count a
                  RedundancyPolicy decides after engine steps, see raymoe.actors.serve.experts)
                 │  experts.backend=remote: one gloo pair per shard, no Serve hop on the data path
                 ▼
             ExpertShards × [min_shards, max_shards]   (autoscaled by ExpertRedundancyPolicy on expert balance;
                 raymoe.actors.serve.expert_shards)

The batching loop of a replica waits until some request is pending, then repeatedly runs ``engine.step()`` in a
worker thread (so the replica's event loop keeps accepting requests: they join the running batch at the next step)
and pushes each request's delta — new text per choice, new logprob entries, token counts, finish reasons — to that
request's queue. ``add_request``/``abort`` and ``step`` are serialised by one asyncio lock. A cancelled stream
(client gone) aborts its request and frees its KV blocks.

Errors: engine validation → 400/413; the waiting queue over ``engine.max_waiting`` → 503; Serve back-pressure
(``max_queued_requests`` of the engine deployment) → 503; missing/wrong API key → 401. Bodies are OpenAI style
``{"error": {"message", "type", "param", "code"}}``.

Metrics (Prometheus via ``ray.serve.metrics``, exported by Ray's metrics agent): ``raymoe_serve_ttft_s``,
``raymoe_serve_tpot_s`` (histograms), ``raymoe_serve_{prompt,generation}_tokens`` (counters),
``raymoe_serve_tokens_per_s``, ``raymoe_serve_queue_depth``, ``raymoe_serve_running_seqs``,
``raymoe_serve_kv_blocks_used``, ``raymoe_serve_kv_blocks_total``, ``raymoe_serve_spec_acceptance_rate``,
``raymoe_serve_spec_tokens_per_forward`` (gauges).
"""
# no `from __future__ import annotations`: FastAPI must see real annotations (Request) on the ingress methods
import asyncio
import json
import logging
import os
import time
import uuid
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from raymoe.actors.serve import protocol as P

__all__ = ["EngineDeployment", "APIIngress", "build_app", "DEFAULT_ARGS"]

log = logging.getLogger(__name__)

DEFAULT_ARGS: dict[str, Any] = {
    "model_path": None,
    "tokenizer_path": None,
    "served_model_name": None,
    "api_key": None,
    "engine": {},
    "experts": {},
    "torch_threads": 1,
    "engine_num_cpus": 1,
    "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16},
    "engine_max_ongoing_requests": 128,
    "engine_max_queued_requests": 256,
    "ingress_max_ongoing_requests": 512,
    "max_body_bytes": 1 << 20,
}


@serve.deployment(name="EngineDeployment")
class EngineDeployment:
    def __init__(self, model_path: str, engine: dict, tokenizer_path: Optional[str] = None,
                 torch_threads: int = 1, experts: Optional[dict] = None, expert_shards: Any = None) -> None:
        import torch

        from raymoe.actors.serve.experts import ExpertServing
        from raymoe.engine import EngineConfig, LLMEngine

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        # redundant experts: in-process shards, ExpertShards replicas (``expert_shards``: that deployment's handle,
        # bound so Serve deploys it; the data plane goes through the app's expert registry), or none
        self.expert_shards = expert_shards
        self.experts = ExpertServing(model_path, experts, serve.get_replica_context().app_name)
        self.engine = LLMEngine.from_pretrained(model_path, EngineConfig.from_dict(engine), tokenizer_path,
                                                expert_backend=self.experts.backend)
        self.lock = asyncio.Lock()
        self.wake = asyncio.Event()
        self.queues: dict[str, asyncio.Queue] = {}
        self.sent: dict[str, dict[str, list[int]]] = {}
        self.loop_task: Optional[asyncio.Task] = None
        self._tok_window: list[tuple[float, int]] = []
        self._init_metrics()

    def _init_metrics(self) -> None:
        from ray.serve import metrics as M

        b_lat = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
        self.m_ttft = M.Histogram("raymoe_serve_ttft_s", "time to first token (s)", boundaries=b_lat)
        self.m_tpot = M.Histogram("raymoe_serve_tpot_s", "time per output token after the first (s)",
                                  boundaries=b_lat)
        self.m_prompt = M.Counter("raymoe_serve_prompt_tokens", "prompt tokens admitted")
        self.m_gen = M.Counter("raymoe_serve_generation_tokens", "tokens generated")
        self.m_tps = M.Gauge("raymoe_serve_tokens_per_s", "generated tokens per second (10 s window)")
        self.m_queue = M.Gauge("raymoe_serve_queue_depth", "sequences waiting for admission")
        self.m_running = M.Gauge("raymoe_serve_running_seqs", "sequences in the running batch")
        self.m_kv = M.Gauge("raymoe_serve_kv_blocks_used", "paged KV cache blocks in use")
        self.m_kv_total = M.Gauge("raymoe_serve_kv_blocks_total", "paged KV cache blocks")
        self.m_acc = M.Gauge("raymoe_serve_spec_acceptance_rate", "MTP draft acceptance rate")
        self.m_tpf = M.Gauge("raymoe_serve_spec_tokens_per_forward", "tokens emitted per verify forward")
        self._last = {"prompt_tokens": 0, "generation_tokens": 0}

    def _update_metrics(self) -> None:
        m = self.engine.metrics()
        for key, counter in (("prompt_tokens", self.m_prompt), ("generation_tokens", self.m_gen)):
            d = int(m[key] - self._last[key])
            if d > 0:
                counter.inc(d)
            self._last[key] = m[key]
        now = time.monotonic()
        self._tok_window.append((now, int(m["generation_tokens"])))
        while self._tok_window and now - self._tok_window[0][0] > 10:
            self._tok_window.pop(0)
        t0, n0 = self._tok_window[0]
        self.m_tps.set((m["generation_tokens"] - n0) / (now - t0) if now > t0 else 0.0)
        self.m_queue.set(m["waiting"])
        self.m_running.set(m["running"])
        self.m_kv.set(m["kv_blocks_used"])
        self.m_kv_total.set(m["kv_blocks_total"])
        self.m_acc.set(m["spec_acceptance_rate"])
        self.m_tpf.set(m["spec_tokens_per_forward"])

    def __del__(self) -> None:
        experts = getattr(self, "experts", None)
        if experts is not None:
            experts.close()  # closes remote shard connections, so draining shards are not kept waiting

    async def info(self) -> dict[str, Any]:
        e = self.engine
        return {"pid": os.getpid(), "vocab_size": e.model_config.vocab_size, "max_model_len": e.max_model_len,
                "num_speculative_tokens": e.num_spec, "has_tokenizer": e.tokenizer is not None,
                "metrics": e.metrics(), "experts": self.experts.info()}

    async def _loop(self) -> None:
        while True:
            await self.wake.wait()
            try:
                async with self.lock:
                    outs = await asyncio.to_thread(self.engine.step)
                    self.experts.after_step(outs, int(self.engine.stats["generation_tokens"]))
            except Exception as exc:  # never leave clients hanging: fail every pending request
                log.exception("engine step failed")
                async with self.lock:
                    for rid, q in list(self.queues.items()):
                        q.put_nowait({"error": P.error_body(f"engine failure: {exc}", "server_error"), "status": 500})
                        self.engine.abort(rid)
                self.wake.clear()
                continue
            for o in outs:
                q = self.queues.get(o.request_id)
                if q is not None:
                    q.put_nowait(self._delta(o))
            self._update_metrics()
            if not self.engine.has_unfinished():
                self.wake.clear()
            await asyncio.sleep(0)

    def _delta(self, o) -> dict[str, Any]:
        st = self.sent.setdefault(o.request_id, {"text": [0] * len(o.outputs), "lp": [0] * len(o.outputs)})
        choices = []
        for c in o.outputs:
            i = c.index
            text = c.text[st["text"][i]:]
            st["text"][i] = len(c.text)
            lps = None
            if c.logprobs is not None:
                lps = c.logprobs[st["lp"][i]:]
                st["lp"][i] = len(c.logprobs)
            choices.append({"index": i, "text": text, "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
                            "logprobs": lps})
        m = o.metrics
        out = {"prompt_tokens": len(o.prompt_token_ids), "choices": choices, "finished": o.finished}
        if o.finished:
            ft = m.get("first_token_time")
            if ft is not None:
                self.m_ttft.observe(ft - m["arrival_time"])
                ntok = sum(c["num_tokens"] for c in choices)
                if ntok > len(choices):
                    self.m_tpot.observe((m["finish_time"] - ft) / (ntok / len(choices) - 1))
            self.sent.pop(o.request_id, None)
        return out

    async def generate(self, prompt: Any, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream of deltas for one request; the first item is ``{"error": ..., "status": code}`` on rejection."""
        from raymoe.engine import EngineError, EngineFull, SamplingParams

        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.get_running_loop().create_task(self._loop())
        rid = uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        async with self.lock:
            try:
                self.engine.add_request(rid, prompt, SamplingParams(**params))
            except EngineError as e:
                typ = "invalid_request_error"
                yield {"error": P.error_body(str(e), typ, e.param, "context_length_exceeded" if e.code == 413 else None),
                       "status": e.code}
                return
            except EngineFull as e:
                yield {"error": P.error_body(f"server overloaded: {e}", "server_overloaded"), "status": 503}
                return
            self.queues[rid] = q
        self.wake.set()
        finished = False
        try:
            while not finished:
                item = await q.get()
                finished = bool(item.get("finished")) or "error" in item
                yield item
        finally:
            self.queues.pop(rid, None)
            self.sent.pop(rid, None)
            if not finished:  # cancelled (client disconnected): free its blocks
                async with self.lock:
                    self.engine.abort(rid)


app = FastAPI(title="raymoe", docs_url=None, redoc_url=None)


def _err(e: P.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@serve.deployment(name="APIIngress")
@serve.ingress(app)
class APIIngress:
    def __init__(self, engine, model_name: str, api_key: Optional[str] = None, max_body_bytes: int = 1 << 20,
                 tokenizer_path: Optional[str] = None) -> None:
        from raymoe.engine import load_tokenizer

        self.engine = engine
        try:
            self.tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
        except FileNotFoundError:
            self.tokenizer = None
        self.model_name = model_name
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())

    # ------------------------------------------------------------------ helpers
    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        h = request.headers.get("authorization", "")
        if h != f"Bearer {self.api_key}":
            raise P.APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                             "authentication_error", code="invalid_api_key")

    async def _body(self, request: Request) -> Any:
        raw = await request.body()
        if len(raw) > self.max_body_bytes:
            raise P.APIError(413, f"request body of {len(raw)} bytes exceeds {self.max_body_bytes}",
                             code="request_too_large")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise P.APIError(400, f"request body is not valid JSON: {e}") from None

    def _check_model(self, body: dict) -> None:
        m = body.get("model")
        if m is not None and m != self.model_name:
            raise P.APIError(404, f"the model '{m}' does not exist", param="model", code="model_not_found")

    async def _open(self, prompt: Any, sp) -> tuple[dict, Any]:
        """Start the engine stream; return its first item (raises APIError for a rejection) and the stream."""
        from ray.serve.exceptions import BackPressureError

        params = dict(sp.__dict__)
        try:
            gen = self.engine.options(stream=True).generate.remote(prompt, params)
            first = await gen.__anext__()
        except BackPressureError as e:
            raise P.APIError(503, f"server overloaded: {e}", "server_overloaded") from None
        if "error" in first:
            err = first["error"]["error"]
            raise P.APIError(first["status"], err["message"], err["type"], err.get("param"), err.get("code"))
        return first, gen

    @staticmethod
    async def _items(first: dict, gen) -> AsyncIterator[dict]:
        yield first
        if first.get("finished"):
            return
        async for item in gen:
            if "error" in item:
                raise RuntimeError(item["error"]["error"]["message"])
            yield item
            if item.get("finished"):
                return

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health(self) -> JSONResponse:
        await self.engine.info.remote()
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            self._auth(request)
        except P.APIError as e:
            return _err(e)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "raymoe"}]})

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, chat=True)

    async def _handle(self, request: Request, chat: bool):
        try:
            self._auth(request)
            body = await self._body(request)
            prompt, sp, stream = (P.parse_chat if chat else P.parse_completion)(body)
            self._check_model(body)
            first, gen = await self._open(prompt, sp)
        except P.APIError as e:
            return _err(e)
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        decode = await self._decoder()
        if stream:
            return StreamingResponse(self._stream(rid, chat, sp, first, gen, decode), media_type="text/event-stream")
        texts = [""] * sp.n
        lps: list[list[dict]] = [[] for _ in range(sp.n)]
        ntok, finish = [0] * sp.n, [None] * sp.n
        prompt_tokens = first["prompt_tokens"]
        async for item in self._items(first, gen):
            for c in item["choices"]:
                i = c["index"]
                texts[i] += c["text"]
                ntok[i] = c["num_tokens"]
                finish[i] = c["finish_reason"]
                if c["logprobs"]:
                    lps[i].extend(c["logprobs"])
        use = P.usage(prompt_tokens, sum(ntok))
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": P.chat_logprobs(lps[i], decode) if sp.logprobs is not None else None,
                        "finish_reason": finish[i]} for i in range(sp.n)]
            return JSONResponse(P.chat_response(rid, self.model_name, choices, use))
        choices = [{"index": i, "text": texts[i],
                    "logprobs": P.completion_logprobs(lps[i], decode) if sp.logprobs is not None else None,
                    "finish_reason": finish[i]} for i in range(sp.n)]
        return JSONResponse(P.completion_response(rid, self.model_name, choices, use))

    async def _decoder(self):
        """Token id → string (logprob entries); ids as text when the model has no tokenizer."""
        tok = self.tokenizer
        return (lambda ids: tok.decode(list(ids), skip_special_tokens=False)) if tok else (lambda ids: str(ids[0]))

    async def _stream(self, rid: str, chat: bool, sp, first: dict, gen, decode) -> AsyncIterator[str]:
        model = self.model_name
        ntok = [0] * sp.n
        prompt_tokens = first["prompt_tokens"]
        started = [False] * sp.n
        offsets = [0] * sp.n
        try:
            async for item in self._items(first, gen):
                for c in item["choices"]:
                    i = c["index"]
                    ntok[i] = c["num_tokens"]
                    text, fin, lp_entries = c["text"], c["finish_reason"], c["logprobs"] or []
                    if chat:
                        if not started[i]:
                            started[i] = True
                            yield _sse(P.chat_chunk(rid, model, i, {"role": "assistant", "content": ""}, None))
                        if text or lp_entries:
                            lp = P.chat_logprobs(lp_entries, decode) if sp.logprobs is not None else None
                            yield _sse(P.chat_chunk(rid, model, i, {"content": text}, None, lp))
                        if fin:
                            yield _sse(P.chat_chunk(rid, model, i, {}, fin))
                    else:
                        if text or lp_entries or fin:
                            lp = None
                            if sp.logprobs is not None:
                                lp = P.completion_logprobs(lp_entries, decode, offsets[i])
                            offsets[i] += len(text)
                            yield _sse(P.completion_chunk(rid, model, i, text, fin, lp))
            obj = "chat.completion.chunk" if chat else "text_completion"
            yield _sse(P.usage_chunk(rid, model, obj, P.usage(prompt_tokens, sum(ntok))))
        except Exception as e:  # noqa: BLE001 - mid-stream failure: report it in-band
            yield _sse(P.error_body(str(e), "server_error"))
        yield "data: [DONE]\n\n"


def expert_shards_deployment(experts: dict[str, Any]):
    """The bound ``ExpertShards`` deployment for ``experts.backend=remote`` (else None): ``num_shards`` initial
    replicas within ``[min_shards, max_shards]``, scaled by :class:`ExpertRedundancyPolicy` on the replicas'
    reported rows/s every ``remote.interval_s``."""
    from raymoe.engine import ExpertsConfig

    d = {k: v for k, v in experts.items() if k not in ("decide_every_steps", "remote")}
    cfg = ExpertsConfig.from_dict(d)  # validates (unknown keys, bad values) before anything is deployed
    if cfg.backend != "remote":
        return None
    from raymoe.actors.serve.expert_shards import POLICY_PATH, ExpertShardDeployment, RemoteShardsConfig
    from raymoe.engine.redundancy import PolicyConfig

    rc = RemoteShardsConfig.from_dict(experts.get("remote"))
    lo, hi = cfg.min_shards or cfg.num_shards, cfg.max_shards or cfg.num_shards
    policy = {**dict(cfg.policy or {}), "min_shards": lo, "max_shards": hi}
    PolicyConfig.from_dict(policy)  # validate here, not in the Serve controller
    autoscaling = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": cfg.num_shards,
                   "metrics_interval_s": rc.interval_s, "look_back_period_s": max(2 * rc.interval_s, 1.0),
                   "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
                   "policy": {"policy_function": POLICY_PATH, "policy_kwargs": {**policy, "interval_s": rc.interval_s}}}
    return ExpertShardDeployment.options(
        autoscaling_config=autoscaling, ray_actor_options={"num_cpus": rc.num_cpus},
        graceful_shutdown_timeout_s=rc.drain_timeout_s + 5,
    ).bind(rc.host, rc.torch_threads, rc.drain_timeout_s)


def build_app(args: dict[str, Any]):
    """Serve application builder (``import_path: raymoe.actors.serve.app:build_app`` in a Serve config).

    ``args``: see :data:`DEFAULT_ARGS`; ``model_path`` is required, ``engine`` holds
    :class:`raymoe.engine.EngineConfig` fields, ``experts`` the redundant-expert settings
    (:mod:`raymoe.actors.serve.experts`), ``autoscaling`` Serve's ``autoscaling_config``.
    """
    a = {**DEFAULT_ARGS, **{k: v for k, v in dict(args or {}).items() if v is not None}}
    unknown = set(a) - set(DEFAULT_ARGS)
    if unknown:
        raise ValueError(f"unknown serve app args {sorted(unknown)}")
    if not a["model_path"]:
        raise ValueError("model_path is required")
    name = a["served_model_name"] or str(a["model_path"]).rstrip("/").split("/")[-1]
    experts = dict(a["experts"] or {})
    engine = EngineDeployment.options(
        autoscaling_config=dict(a["autoscaling"]),
        ray_actor_options={"num_cpus": a["engine_num_cpus"]},
        max_ongoing_requests=a["engine_max_ongoing_requests"],
        max_queued_requests=a["engine_max_queued_requests"],
    ).bind(str(a["model_path"]), dict(a["engine"] or {}), a["tokenizer_path"], a["torch_threads"], experts,
           expert_shards_deployment(experts))
    tok_path = a["tokenizer_path"] or str(a["model_path"])
    return APIIngress.options(max_ongoing_requests=a["ingress_max_ongoing_requests"], ray_actor_options={
        "num_cpus": 0}).bind(engine, name, a["api_key"], a["max_body_bytes"], tok_path)
