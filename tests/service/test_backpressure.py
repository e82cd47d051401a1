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
