"""The chat path is bounded: past `max_inflight` requests a new one is refused at once (503, Retry-After,
the error envelope), and a request over `request_timeout_s` gets 504 and its engine work is cancelled
(on vLLM, a cancelled request is aborted). An engine stands in that answers only when told to."""

from __future__ import annotations

import asyncio
import json

import httpx

from moerge.config import Settings
from moerge.models.generation import Generation, StreamDelta
from moerge.plan import ExecutionPlan
from moerge.router.base import RoutingDecision
from moerge.service.app import create_app
from moerge.service.runtime import RequestPlan

CHAT = {"model": "base", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


class HeldRuntime:
    """A runtime whose engine answers when `release` is set, and counts the requests it saw cancelled."""

    def __init__(self, tmp_path, **settings):
        self.settings = Settings(home=tmp_path, bundled_pool=False, **settings)
        self.release = asyncio.Event()
        self.cancelled = 0

    def plan(self, model, messages):
        return RequestPlan(RoutingDecision("base", "none", abstained=True), ExecutionPlan("base"))

    async def agenerate(self, messages, params, rp):
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return Generation("ok", 1, 1, "stop")

    async def astream(self, messages, params, rp):
        try:
            yield StreamDelta(text="o")
            await self.release.wait()
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise
        yield StreamDelta("", "stop", 1, 1)


def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def test_past_max_inflight_a_request_gets_503_with_retry_after_and_the_slot_comes_back(tmp_path):
    async def run():
        rt = HeldRuntime(tmp_path, max_inflight=2)
        async with _client(create_app(rt)) as client:
            held = [asyncio.create_task(client.post("/v1/chat/completions", json={**CHAT, "stream": s}))
                    for s in (False, True)]
            await asyncio.sleep(0.3)
            assert not any(t.done() for t in held)
            try:
                refused = await asyncio.wait_for(client.post("/v1/chat/completions", json=CHAT), 10)
            finally:
                rt.release.set()
            codes = [(await t).status_code for t in held]
            again = await client.post("/v1/chat/completions", json=CHAT)
        return refused, codes, again, rt

    refused, codes, again, rt = asyncio.run(run())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    err = refused.json()["error"]
    assert err["code"] == "503" and "max_inflight" in err["message"]
    assert codes == [200, 200]
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == "ok"
    assert rt.cancelled == 0


def test_a_request_over_the_timeout_gets_504_and_its_engine_work_is_cancelled(tmp_path):
    async def run():
        rt = HeldRuntime(tmp_path, request_timeout_s=0.5, max_inflight=1)
        async with _client(create_app(rt)) as client:
            plain = await asyncio.wait_for(client.post("/v1/chat/completions", json=CHAT), 30)
            streamed = await asyncio.wait_for(
                client.post("/v1/chat/completions", json={**CHAT, "stream": True}), 30)
            rt.release.set()
            after = await client.post("/v1/chat/completions", json=CHAT)   # both slots were given back
        return plain, streamed, after, rt

    plain, streamed, after, rt = asyncio.run(run())
    assert plain.status_code == 504
    assert plain.json()["error"]["code"] == "504" and "request_timeout_s" in plain.json()["error"]["message"]
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "504" and "request_timeout_s" in err["message"]
    assert rt.cancelled == 2
    assert after.status_code == 200


def _serve(app):
    import threading
    import time

    import uvicorn

    from tests.service.test_openai_client import free_port
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return server, thread, port


def _post_then_hang_up(port: int, body: dict, wait_for: bytes | None) -> bytes:
    """Send a chat request on a raw socket, read until `wait_for` (or 0.8 s), then close the connection."""
    import socket
    import time
    data = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + data)
        if wait_for is None:
            time.sleep(0.8)
        else:
            while wait_for not in got:
                got += sock.recv(4096)
    return got


def test_a_client_that_hangs_up_has_its_engine_work_cancelled_plain_and_streamed(tmp_path):
    import time
    rt = HeldRuntime(tmp_path)
    server, thread, port = _serve(create_app(rt))
    try:
        _post_then_hang_up(port, CHAT, None)
        deadline = time.monotonic() + 10
        while rt.cancelled < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        plain = rt.cancelled
        first = _post_then_hang_up(port, {**CHAT, "stream": True}, b'"content": "o"')
        deadline = time.monotonic() + 10
        while rt.cancelled < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        streamed = rt.cancelled
    finally:
        server.should_exit = True
        thread.join(10)
    assert plain == 1
    assert b"200 OK" in first and streamed == 2
