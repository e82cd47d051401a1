"""Stock vLLM OpenAI servers as engines: base and single-adapter plans over HTTP, on the server that
holds the adapter (placement: moerge/executors/placement.py).

The mechanism lives here: an httpx client for the servers' completion, runtime-LoRA, model-list and
health endpoints, a health watch that marks servers down and up, and the executor protocol. Every
HTTP call and the placement table live on one event loop in a thread of their own; callers on
other loops (the service's) await it without holding a thread.

A chat is sent as a completion of its prompt token ids, encoded here by moerge's one chat encoder
(moerge.models.chat), so a server answers the same prompt as the in-process engines. An adapter's
model name on a server is its versioned key `name@sha16`: a re-registered expert is another model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path

import httpx

from moerge.experts.errors import ExpertError
from moerge.executors.placement import AdapterLoadError, EngineDown, Lease, NoEngineError, PlacementTable
from moerge.models.chat import encode_chat
from moerge.models.generation import Generation, SamplingParams, StreamDelta
from moerge.plan import EngineCaps, ExecutionPlan

log = logging.getLogger("moerge.vllm_servers")
SERVER_KINDS = frozenset({"base", "adapter"})
_END = object()


class ServerRequestError(ExpertError):
    """A vLLM server refused a request (its status and message are passed on)."""


class ServerStreamError(ExpertError):
    """A vLLM server stopped in the middle of a streamed answer (502)."""
    status = 502


class _NotHeld(Exception):
    """The server does not know the adapter the request names (it restarted, or it was unloaded)."""


class ServerClient:
    """HTTP calls to vLLM OpenAI servers (one `httpx.AsyncClient` for all of them)."""

    def __init__(self, timeout_s: float, load_timeout_s: float = 120.0):
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0),
                                      limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))
        self.load_timeout_s = load_timeout_s

    async def _post(self, url: str, path: str, body: dict, timeout: float | None = None) -> httpx.Response:
        try:
            kw = {"timeout": httpx.Timeout(timeout, connect=5.0)} if timeout else {}
            return await self.http.post(url + path, json=body, **kw)
        except httpx.TransportError as e:
            raise EngineDown(url, f"{type(e).__name__}: {e}") from e

    async def load(self, url: str, key: str, path: str) -> None:
        r = await self._post(url, "/v1/load_lora_adapter", {"lora_name": key, "lora_path": path},
                             self.load_timeout_s)
        if r.status_code == 200 or "already been loaded" in r.text:
            return
        if r.status_code == 404 and "load_lora_adapter" in r.text:
            raise AdapterLoadError(f"{url} has no runtime LoRA endpoints: start it with "
                                   "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora")
        raise AdapterLoadError(f"{url} did not load adapter {key} from {path} ({r.status_code}: "
                               f"{_message(r)}); check the server's --max-lora-rank and that it can read the "
                               "pool folder (same host or shared volume)")

    async def unload(self, url: str, key: str) -> None:
        r = await self._post(url, "/v1/unload_lora_adapter", {"lora_name": key})
        if r.status_code not in (200, 404):
            log.warning("%s did not unload %s (%d: %s)", url, key, r.status_code, _message(r))

    async def models(self, url: str) -> tuple[str, list[str]]:
        """(the served base model's name, the LoRA adapters the server holds)."""
        try:
            r = await self.http.get(url + "/v1/models", timeout=5.0)
            r.raise_for_status()
        except httpx.HTTPError as e:
            raise EngineDown(url, f"{type(e).__name__}: {e}") from e
        cards = r.json()["data"]
        base = next((c["id"] for c in cards if not c.get("parent")), cards[0]["id"] if cards else "")
        return base, [c["id"] for c in cards if c.get("parent")]

    async def healthy(self, url: str) -> bool:
        try:
            return (await self.http.get(url + "/health", timeout=2.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def complete(self, url: str, body: dict) -> dict:
        r = await self._post(url, "/v1/completions", body)
        _check(url, r, body["model"])
        return r.json()

    async def stream(self, url: str, body: dict) -> AsyncIterator[dict]:
        """The server's chunks; leaving the iterator closes the connection, and vLLM aborts the request."""
        try:
            async with self.http.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    _check(url, r, body["model"])
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        yield json.loads(line[6:])
        except httpx.TransportError as e:
            raise EngineDown(url, f"{type(e).__name__}: {e}") from e

    async def aclose(self) -> None:
        await self.http.aclose()


def _message(r: httpx.Response) -> str:
    try:
        body = r.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except ValueError:
        return r.text[:300]


def _check(url: str, r: httpx.Response, model: str) -> None:
    if r.status_code == 200:
        return
    if r.status_code == 404 and model in r.text:
        raise _NotHeld(model)
    err = ServerRequestError(f"the vLLM server {url} refused the request ({r.status_code}): {_message(r)}")
    err.status = r.status_code if r.status_code < 500 else 502
    raise err


class VllmServersExecutor:
    name = "servers"

    def __init__(self, urls: list[str], model_dir: Path, *, max_loras: int = 4, max_lora_rank: int = 64,
                 slot_wait_s: float = 30.0, timeout_s: float = 600.0, health_every_s: float = 1.0,
                 start: bool = True):
        from transformers import AutoTokenizer
        if not urls:
            raise ValueError("the servers executor needs engine_urls (MOERGE_ENGINE_URLS='[\"http://host:port\"]')")
        self.urls = [u.rstrip("/") for u in urls]
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.slot_wait_s = slot_wait_s
        self.timeout_s = timeout_s
        self.health_every_s = health_every_s
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.client: ServerClient | None = None
        self.table: PlacementTable | None = None
        self._started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="vllm-servers", daemon=True)
        self._watch: asyncio.Task | None = None
        if start:
            self._thread.start()
            self._started.wait(30)

    # -- lifecycle --------------------------------------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self.client = ServerClient(self.timeout_s)
        self.table = PlacementTable(self.urls, self.max_loras, self.client, self.slot_wait_s)
        self._watch = self._loop.create_task(self._watch_health())
        self._loop.call_soon(self._started.set)
        self._loop.run_forever()

    async def _watch_health(self) -> None:
        """Every `health_every_s`: a server that stopped answering is marked down; one that answers again
        is read (its base model, the adapters it holds) and serves again."""
        while True:
            await asyncio.gather(*[self._check(u) for u in self.urls])
            await asyncio.sleep(self.health_every_s)

    async def _check(self, url: str) -> None:
        engine = self.table.engines[url]
        if not await self.client.healthy(url):
            if engine.up:
                self.table.mark_down(url, "/health does not answer")
            return
        if not engine.up:
            try:
                base, adapters = await self.client.models(url)
            except EngineDown:
                return
            await self.table.mark_up(url, base, adapters)

    def ready(self) -> bool:
        return self.table is not None and any(e.up for e in self.table.engines.values())

    def wait_ready(self, timeout: float = 600, engines: int | None = None) -> bool:
        """Wait until `engines` servers (default: all) are up."""
        import time
        want = len(self.urls) if engines is None else engines
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.table is not None and sum(e.up for e in self.table.engines.values()) >= want:
                return True
            time.sleep(0.2)
        return False

    def caps(self) -> EngineCaps:
        return EngineCaps("servers", ready=self.ready(), kinds=SERVER_KINDS, max_rank=self.max_lora_rank,
                          max_experts=1, not_ready_reason=f"no vLLM server answers ({', '.join(self.urls)})")

    def placement(self) -> list[dict]:
        """Each server: up, requests in flight, the adapters it holds, loads and unloads (by reason)."""
        return self._call(self._snapshot(), 10)

    async def _snapshot(self) -> list[dict]:
        return self.table.snapshot()

    def describe(self) -> dict:
        return {"engine": "servers", "ready": self.ready(), "max_loras": self.max_loras,
                "max_lora_rank": self.max_lora_rank, "servers": self.placement()}

    def forget(self, name: str) -> None:
        """Expert `name` was removed: its adapters leave the servers once no request uses them."""
        self._loop.call_soon_threadsafe(self.table.forget, name)

    def shutdown(self) -> None:
        if not self._loop.is_running():
            return

        async def stop():
            self._watch.cancel()
            await self.client.aclose()
        self._call(stop(), 30)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _on_loop(self, coro) -> asyncio.Future:
        """`coro` on this executor's loop, awaitable from another loop; cancelling cancels it there."""
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    # -- one request ------------------------------------------------------------------------------
    def _body(self, model: str, prompt: list[int], params: SamplingParams, stream: bool) -> dict:
        body = {"model": model, "prompt": prompt, "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "return_token_ids": True,
                "stream": stream}
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        if params.ignore_eos:
            body["ignore_eos"] = True
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    async def _lease(self, plan: ExecutionPlan) -> Lease:
        if plan.kind == "base":
            return await self.table.acquire(None)
        if plan.kind != "adapter":
            raise ValueError(f"vLLM servers do not run {plan.kind} plans (make_plan should not have sent it here)")
        ref = plan.experts[0]
        return await self.table.acquire(ref.key, ref.name, ref.adapter_dir)

    async def _generate(self, prompt: list[int], params: SamplingParams, plan: ExecutionPlan) -> Generation:
        """One answer; a server that is down or lost the adapter is left for another (or the same, reloaded)."""
        for _ in range(2 * len(self.urls) + 1):
            lease = await self._lease(plan)
            try:
                out = await self.client.complete(lease.engine.url, self._body(lease.model, prompt, params, False))
            except EngineDown as e:
                self.table.mark_down(lease.engine.url, str(e))
                continue
            except _NotHeld:
                self.table.lost(lease)
                continue
            finally:
                self.table.release(lease)
            choice = out["choices"][0]
            ids = list(choice.get("token_ids") or [])
            return Generation(choice["text"], len(prompt), len(ids),
                              "length" if choice.get("finish_reason") == "length" else "stop", token_ids=ids,
                              cached_tokens=_cached_tokens(out.get("usage")))
        raise _every_attempt_failed()

    async def _stream(self, prompt: list[int], params: SamplingParams, plan: ExecutionPlan
                      ) -> AsyncIterator[StreamDelta]:
        """Deltas as the server sends them. Before the first text, a failed server is left for another;
        after it, the stream ends with ServerStreamError. Closing this closes the server's stream."""
        for _ in range(2 * len(self.urls) + 1):
            lease = await self._lease(plan)
            sent, n_out, finish, cached = False, 0, "stop", 0
            try:
                async with aclosing(self.client.stream(lease.engine.url,
                                                       self._body(lease.model, prompt, params, True))) as chunks:
                    async for chunk in chunks:
                        if chunk.get("usage"):
                            n_out = chunk["usage"].get("completion_tokens") or n_out
                            cached = _cached_tokens(chunk["usage"]) or cached
                        for c in chunk.get("choices") or []:
                            if c.get("finish_reason"):
                                finish = "length" if c["finish_reason"] == "length" else "stop"
                            if c.get("text"):
                                sent = True
                                yield StreamDelta(text=c["text"])
            except EngineDown as e:
                self.table.mark_down(lease.engine.url, str(e))
                if sent:
                    raise ServerStreamError(f"the vLLM server {lease.engine.url} stopped in the middle of this "
                                            "answer, which is cut short here: send the request again") from e
                continue
            except _NotHeld:
                self.table.lost(lease)
                continue
            finally:
                self.table.release(lease)
            yield StreamDelta("", finish, len(prompt), n_out, cached_tokens=cached)
            return
        raise _every_attempt_failed()

    # -- the executor protocol ----------------------------------------------------------------------
    def generate(self, messages: list[dict], params: SamplingParams, plan: ExecutionPlan) -> Generation:
        return self._call(self._generate(encode_chat(self.tokenizer, messages), params, plan))

    def generate_tokens(self, prompt_ids: list[int], params: SamplingParams, plan: ExecutionPlan) -> Generation:
        return self._call(self._generate(prompt_ids, params, plan))

    def generate_many(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                      plans: list[ExecutionPlan]) -> list[Generation]:
        """Every request at once (the servers batch them); params: one, or one per prompt."""
        if len(prompts) != len(plans):
            raise ValueError("one plan per prompt")
        per = params if isinstance(params, list) else [params] * len(prompts)

        async def run():
            return await asyncio.gather(*[self._generate(p, sp, plan) for p, sp, plan in zip(prompts, per, plans)])
        return self._call(run())

    def complete(self, messages: list[dict], max_tokens: int) -> str:
        return self.generate(messages, SamplingParams(max_tokens=max_tokens), ExecutionPlan("base")).text

    async def agenerate(self, messages: list[dict], params: SamplingParams, plan: ExecutionPlan) -> Generation:
        return await self._on_loop(self._generate(encode_chat(self.tokenizer, messages), params, plan))

    async def astream(self, messages: list[dict], params: SamplingParams, plan: ExecutionPlan
                      ) -> AsyncIterator[StreamDelta]:
        """Each delta is awaited on this executor's loop; closing this generator (a client gone) closes the
        server's stream there, and vLLM aborts the request."""
        inner = self._stream(encode_chat(self.tokenizer, messages), params, plan)
        try:
            while (item := await self._on_loop(_next(inner))) is not _END:
                yield item
        finally:
            asyncio.run_coroutine_threadsafe(inner.aclose(), self._loop)

    def stream(self, messages: list[dict], params: SamplingParams, plan: ExecutionPlan) -> Iterator[StreamDelta]:
        inner = self._stream(encode_chat(self.tokenizer, messages), params, plan)
        try:
            while (item := self._call(_next(inner))) is not _END:
                yield item
        finally:
            asyncio.run_coroutine_threadsafe(inner.aclose(), self._loop)


def _every_attempt_failed() -> NoEngineError:
    return NoEngineError("the vLLM servers failed this request on every attempt (see the servers' logs); "
                         "send it again")


async def _next(it: AsyncIterator):
    return await anext(it, _END)


def _cached_tokens(usage: dict | None) -> int:
    """The prompt tokens a server took from its prefix cache, from its usage (servers started with
    --enable-prompt-tokens-details report them; others report nothing: 0)."""
    details = (usage or {}).get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)
