"""The HTTP service: OpenAI-compatible chat over the expert pool."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import aclosing

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from moerge.config import Settings
from moerge.experts.errors import ExpertError
from moerge.models.generation import SamplingParams
from moerge.service.console_api import add_console
from moerge.service.experts_api import build_router
from moerge.service.limits import KeyedLimits, RequestLimits
from moerge.service.ops import KeyCheck, Metrics, RateLimiter, redact_access_log
from moerge.service.runtime import Runtime
from moerge.service.schemas import ChatCompletionRequest, ChatMessage, FeedbackRequest, completion_id, now

log = logging.getLogger("moerge.service")


def error_body(message: str, status: int, type_: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code or str(status)}}


def usage_body(prompt: int, completion: int, cached: int) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens` is the prompt tokens the engine
    reused from its prefix cache (0 where an engine has none)."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _params(req: ChatCompletionRequest, settings: Settings) -> SamplingParams:
    max_tokens = req.max_completion_tokens or req.max_tokens or 256
    if max_tokens > settings.max_new_tokens_limit:
        raise ExpertError(f"max_tokens={max_tokens} is over this server's limit of "
                          f"{settings.max_new_tokens_limit}")
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                          stop=list(req.stop or []), seed=req.seed, ignore_eos=req.ignore_eos)


class ServerBusyError(ExpertError):
    status = 503
    retry_after = 1


class EngineTimeoutError(ExpertError):
    status = 504


class ClientGoneError(ExpertError):
    status = 499       # nginx's "client closed request": nobody reads it, the log and metrics do


class InflightLimit:
    """Chat requests admitted at once over all keys (`max_inflight`; 0 = unlimited): one more is refused
    at once with 503 + Retry-After instead of waiting where nothing can see it."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open = 0

    def admit(self) -> "InflightSlot":
        if self.limit and self.open >= self.limit:
            raise ServerBusyError(f"the server is answering {self.open} requests, its limit (max_inflight); "
                                  "send the request again shortly")
        self.open += 1     # one event loop: no lock needed
        return InflightSlot(self)


class InflightSlot:
    def __init__(self, limit: InflightLimit):
        self._limit: InflightLimit | None = limit

    def release(self) -> None:      # idempotent: a stream releases at its end and in its background task
        if self._limit is not None:
            self._limit.open -= 1
            self._limit = None


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.1)     # not expected after the body; never a busy loop


async def _until_done(request: Request, work, timeout_s: float):
    """Await `work`; cancel it (vLLM aborts the request) when the client disconnects or `timeout_s` passes.

    The body has been read, so the next ASGI message is the disconnect; a waiting receive sees it
    (a polled `is_disconnected` does not get through the http middleware)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=timeout_s or None,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if gone in done:
            raise ClientGoneError("the client disconnected; the engine request was aborted")
        raise EngineTimeoutError(f"the answer took longer than this server's limit of {timeout_s:g} s "
                                 "(request_timeout_s) and was stopped")
    finally:
        for t in (task, gone):
            if not t.done():
                t.cancel()


class RouteRequest(BaseModel):
    model: str = "auto"
    messages: list[ChatMessage] = Field(min_length=1)


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="moerge", version="0.1.0")
    app.state.runtime = runtime
    keys = KeyCheck(runtime.settings)
    limiter = RateLimiter(runtime.settings.rate_limit_per_minute)
    metrics = Metrics()
    metrics.watch_engines(lambda: getattr(getattr(runtime, "system", None), "local", None))
    app.state.metrics = metrics
    pool = getattr(runtime, "pool", None)
    if hasattr(pool, "on_change"):   # a removed expert's series leave /metrics
        pool.on_change(lambda event, name: metrics.forget_expert(name) if event == "removed" else None)
    feedback = _feedback_store(runtime)
    app.state.feedback = feedback
    inflight = InflightLimit(runtime.settings.max_inflight)
    app.state.inflight = inflight
    metrics.inflight.set_function(lambda: inflight.open)
    app.add_middleware(RequestLimits, limits=KeyedLimits(runtime.settings, keys))
    redact_access_log()
    if runtime.settings.cors_origins:   # off unless origins are listed: no CORS headers at all
        app.add_middleware(CORSMiddleware, allow_origins=list(runtime.settings.cors_origins),
                           allow_methods=["GET", "POST", "PATCH", "DELETE"],
                           allow_headers=["authorization", "content-type"], allow_credentials=False)

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        path = request.scope.get("route").path if request.scope.get("route") else "unmatched"
        metrics.requests.labels(path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - t0)
        log.info(json.dumps({"event": "request", "method": request.method, "path": request.url.path,
                             "status": response.status_code, "ms": round((time.perf_counter() - t0) * 1000, 2)}))
        return response

    def _caller(request: Request) -> str:
        key = keys.user(request.headers.get("authorization"))
        limiter.check(key)
        return key

    def _observe_plan(plan) -> None:
        metrics.routing.labels(plan.method).observe(plan.decision.latency_ms / 1000)
        metrics.count_decision(plan.method, plan.decision.chosen, plan.decision.abstained)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return JSONResponse(error_body("invalid request: " + "; ".join(parts), 400), status_code=400)

    @app.exception_handler(ExpertError)
    async def _expert_error(request: Request, exc: ExpertError):
        retry = getattr(exc, "retry_after", None)
        headers = {"Retry-After": str(retry)} if retry else None
        return JSONResponse(error_body(exc.message, exc.status), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}: see GET /openapi.json for the API"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}: see GET /openapi.json for the API"
        return JSONResponse(error_body(message, exc.status_code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error: the server log has the details", 500,
                                       "server_error"), status_code=500)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        ready, detail = runtime.readiness()
        return JSONResponse({"ready": ready, **detail}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prom():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(build_router(runtime, keys))
    add_console(app, runtime, keys, metrics)

    @app.post("/v1/route")
    async def route(req: RouteRequest, request: Request):
        _caller(request)
        plan = await run_in_threadpool(runtime.plan, req.model, [{"role": m.role, "content": m.text()}
                                                                 for m in req.messages])
        _observe_plan(plan)
        return JSONResponse(plan.info(), headers=plan.headers())

    @app.post("/v1/feedback")
    async def post_feedback(req: FeedbackRequest, request: Request):
        """Store how good a completion was; the `feedback` router learns from it (moerge/router/feedback.py)."""
        _caller(request)
        if feedback is None:
            from moerge.router.feedback import FeedbackUnavailableError
            raise FeedbackUnavailableError("feedback is not available in this server: it keeps no completion "
                                           "records (MOERGE_FEEDBACK_RECORDS=false, or no registry)")
        embed = getattr(getattr(runtime, "router_ctx", None), "embed", None)
        if req.correction is not None:
            slot = inflight.admit()          # the replay uses the engine like a request
            try:
                out = await run_in_threadpool(_add_correction, runtime, feedback, req, embed)
            finally:
                slot.release()
            return {"object": "feedback", "id": out["ids"][0] if out["ids"] else None, "completion_id": req.id,
                    "score": out["score"], "arm": out["arm"], "method": out["method"],
                    "replay": {"arms": out["replayed"], "right": out["right"], "rows": len(out["ids"])}}
        item = await run_in_threadpool(feedback.add_feedback, req.id, score=req.score, label=req.label, embed=embed)
        return {"object": "feedback", "id": item.id, "completion_id": item.completion_id, "score": item.score,
                "arm": item.arm, "method": item.method}

    @app.get("/v1/models")
    async def models():
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "moerge"} for m in runtime.model_ids()]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        _caller(request)
        params = _params(req, runtime.settings)
        messages = req.chat()
        slot = inflight.admit()
        try:
            plan = await run_in_threadpool(runtime.plan, req.model, messages)
        except BaseException:
            slot.release()
            raise
        _observe_plan(plan)
        headers = plan.headers()
        cid, created = completion_id(), now()
        timeout_s = runtime.settings.request_timeout_s
        if req.stream:   # recorded before the first chunk names the id
            await _record(feedback, cid, req.model, messages, plan)
            return StreamingResponse(_sse(runtime, metrics, messages, params, plan, req.model, cid, created,
                                          slot, timeout_s), media_type="text/event-stream", headers=headers,
                                     background=BackgroundTask(slot.release))
        try:
            gen = await _until_done(request, runtime.agenerate(messages, params, plan), timeout_s)
        finally:
            slot.release()
        metrics.count_tokens(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens)
        metrics.count_layer_usage(plan.layer_usage)
        await _record(feedback, cid, req.model, messages, plan)   # after a remote fallback may have changed it
        headers = plan.headers()  # a remote fallback may have changed the plan
        body = {
            "id": cid, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                         "finish_reason": gen.finish_reason, "logprobs": None}],
            "usage": usage_body(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens),
            "moerge": plan.info(),
        }
        return JSONResponse(body, headers=headers)

    return app


def _add_correction(runtime: Runtime, store, req, embed) -> dict:
    """A correction: the completion's query (the last user turn, what routing read) is answered again,
    greedily, by every local expert and by the base model in one engine call, and each answer is
    scored against the correction (router/feedback.py, FeedbackStore.add_correction)."""
    from moerge.router.feedback import arm_decision, replay_max_tokens
    system = runtime.system
    experts = [c.name for c in runtime.pool.list() if c.kind == "lora"]

    def answer(query: str, arms: list[str]) -> dict[str, str]:
        prompt = system.encode([{"role": "user", "content": query}])
        params = SamplingParams(max_tokens=replay_max_tokens(system.local[-1].tokenizer, req.correction),
                                temperature=0.0)
        gens = system.generate_many([prompt] * len(arms), params, [system.plan(arm_decision(a)) for a in arms])
        return {a: g.text for a, g in zip(arms, gens)}

    return store.add_correction(req.id, req.correction, answer, experts=experts, score=req.score, label=req.label,
                                embed=embed)


def _feedback_store(runtime: Runtime):
    """The pool's feedback store (feedback.sqlite beside a SQLite registry, or the PostgreSQL registry's
    database), or None without a registry or with MOERGE_FEEDBACK_RECORDS=false."""
    registry = getattr(getattr(runtime, "pool", None), "registry", None)
    if registry is None or not hasattr(registry, "engine") or not runtime.settings.feedback_records:
        return None
    from moerge.router.feedback import store_for
    return store_for(registry)


async def _record(store, cid: str, model: str, messages: list[dict], plan) -> None:
    """What this completion routed to, so `POST /v1/feedback` can name it. A failure here costs the
    completion its feedback, never its answer."""
    if store is None:
        return
    from moerge.router.base import query_text
    from moerge.router.feedback import plan_record
    try:
        await run_in_threadpool(store.record_completion, cid, model=model, method=plan.decision.method,
                                query=query_text(messages), plan=plan_record(plan.decision, plan.execution.kind))
    except Exception:
        log.warning("could not record completion %s for feedback", cid, exc_info=True)


async def _sse(runtime: Runtime, metrics: Metrics, messages, params, plan, model, cid, created,
               slot: InflightSlot | None = None, timeout_s: float = 0.0):
    def chunk(delta: dict, finish=None, **extra) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""}, moerge=plan.info())
        # closing this generator (the client went away) closes the engine stream: vLLM aborts the request
        async with aclosing(runtime.astream(messages, params, plan)) as stream, \
                asyncio.timeout(timeout_s or None):
            async for delta in stream:
                if delta.text:
                    yield chunk({"content": delta.text})
                if delta.finish_reason:
                    usage = usage_body(delta.prompt_tokens, delta.completion_tokens, delta.cached_tokens)
                    metrics.count_tokens(delta.prompt_tokens, delta.completion_tokens, delta.cached_tokens)
                    metrics.count_layer_usage(plan.layer_usage)
                    # again with the routing explanation: token-level usage is only known now
                    yield chunk({}, finish=delta.finish_reason, usage=usage, moerge=plan.info())
    except TimeoutError:
        message = f"the answer took longer than this server's limit of {timeout_s:g} s (request_timeout_s) and was stopped"
        yield f"data: {json.dumps(error_body(message, 504, 'server_error'))}\n\n"
    except ExpertError as e:    # the engine died under the request, for one: its status, in-band
        log.warning("stream failed: %s", e.message)
        yield f"data: {json.dumps(error_body(e.message, e.status, 'server_error'))}\n\n"
    except Exception as e:  # an error after headers went out: tell the client in-band
        log.exception("stream failed")
        yield f"data: {json.dumps(error_body(str(e), 500, 'server_error'))}\n\n"
    finally:
        if slot is not None:
            slot.release()
    yield "data: [DONE]\n\n"
