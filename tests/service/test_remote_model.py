"""A whole-model expert served by a second, real vLLM OpenAI server on loopback, reached through
LiteLLM; when it fails, the base model answers and the routing info says so.

The faults: the server behind a slow TCP proxy (silent, trickling, stalling mid-stream), then the
server SIGKILLed with two requests on it. One engine start for the whole file; the kill comes last."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest
import torch

from moerge.compute import resolve_dtype
from tests.helpers import make_lora, tree_snapshot

# each chat writes its completion record (for POST /v1/feedback) to feedback.sqlite beside the registry; the
# pool itself (registry and blobs) must stay byte for byte
CHAT_RECORDS = (".lock", "feedback.sqlite", "feedback.sqlite-journal")
from tests.service.test_openai_client import ServerThread, free_port

BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def merged_model(tmp_path_factory, base_model_dir):
    """One expert merged into a full model folder (peft merge_and_unload)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tmp = tmp_path_factory.mktemp("merged")
    ad = make_lora(base_model_dir, tmp / "ad", base_name=BASE_ID, scale_b=0.01)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32), ad)
    merged = model.merge_and_unload()
    merged.to(torch.bfloat16).save_pretrained(tmp / "model")
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(tmp / "model")
    return tmp / "model"


@pytest.fixture(scope="module")
def vllm_server(merged_model):
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "MOERGE_VLLM_PUNICA": "vllm"}
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(merged_model),
                             "--served-model-name", "merged-expert", "--host", "127.0.0.1", "--port", str(port),
                             "--max-model-len", "1024", "--dtype", resolve_dtype(),
                             # no torch.compile: this server stands in for a remote model, and the compile of a
                             # fresh model folder (no cache hit) took ~60 s of its 87 s start here; eager, 34 s
                             "--enforce-eager"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while True:
        assert proc.poll() is None, "the vLLM OpenAI server exited during start-up"
        assert time.time() < deadline, "the vLLM OpenAI server did not start"
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    yield url, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


@pytest.fixture(scope="module")
def served(real_settings, tmp_path_factory):
    """(url, runtime) of a moerge service whose remote timeout is `remote_timeout_s = 30`."""
    from moerge.service.app import create_app
    from moerge.service.factory import build_runtime
    s = real_settings.model_copy(update={"pool_dir": tmp_path_factory.mktemp("remote-pool"), "remote_timeout_s": 30})
    runtime = build_runtime(s, progress=lambda m: None)
    assert runtime.system.remote.timeout == 30
    with ServerThread(create_app(runtime)) as url:
        yield url, runtime


@pytest.fixture(scope="module")
def moerge_server(served):
    return served[0]


def _register_model(url: str, name: str, api_base: str, description: str) -> None:
    r = httpx.post(f"{url}/v1/experts", timeout=60, json={
        "kind": "model", "name": name, "model": "openai/merged-expert", "api_base": api_base,
        "description": description})
    assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def remote_expert(vllm_server, moerge_server):
    """'remote-expert': the vLLM server, registered in the moerge pool."""
    _register_model(moerge_server, "remote-expert", vllm_server[0] + "/v1",
                    "A served model that answers trivia about sea creatures and oceans.")
    return "remote-expert"


@pytest.mark.real
@pytest.mark.slow
def test_remote_whole_model_is_registered_and_routed(vllm_server, moerge_server, remote_expert):
    remote_url, proc = vllm_server
    from openai import OpenAI
    client = OpenAI(base_url=moerge_server + "/v1", api_key="none")
    msgs = [{"role": "user", "content": "Tell me one fact about whales."}]
    pinned = client.chat.completions.create(model="remote-expert", messages=msgs, max_tokens=12, temperature=0)
    direct = OpenAI(base_url=remote_url + "/v1", api_key="none").chat.completions.create(
        model="merged-expert", messages=msgs, max_tokens=12, temperature=0)
    assert pinned.choices[0].message.content == direct.choices[0].message.content
    assert pinned.model_extra["moerge"]["chosen"] == ["remote-expert"]
    routed = client.chat.completions.create(model="moerge:embed", messages=[{
        "role": "user", "content": "Trivia about sea creatures: how deep can a whale dive in the ocean?"}],
        max_tokens=8, temperature=0)
    assert routed.model_extra["moerge"]["chosen"] == ["remote-expert"]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="remote-expert", messages=msgs, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == direct.choices[0].message.content


# -- slow: a TCP proxy in front of the server that holds its bytes back ---------------------------------

class SlowProxy:
    """A loopback TCP proxy in front of `upstream` (host, port), or a socket that never answers (None).

    The client's bytes go through at once. Of the server's bytes, the first `pass_bytes` go through
    at once; after them, `piece` bytes every `every_s` seconds, or nothing more with every_s=None.
    It records when each connection was accepted and when the client hung up."""

    def __init__(self, upstream: tuple[str, int] | None, *, pass_bytes: int = 0, piece: int = 16,
                 every_s: float | None = None):
        self.upstream, self.pass_bytes, self.piece, self.every_s = upstream, pass_bytes, piece, every_s
        self.accepted: list[float] = []
        self.hung_up: list[float] = []
        self.bytes_down = 0
        self._tasks: set[asyncio.Task] = set()

    def wait_for_hang_ups(self, n: int, within_s: float) -> None:
        """Poll until `n` clients have hung up, or `within_s` passed (the caller's assertion then fails)."""
        deadline = time.monotonic() + within_s
        while len(self.hung_up) < n and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self) -> str:
        started = threading.Event()
        self.loop = asyncio.new_event_loop()

        def run():
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
            self.port = self.server.sockets[0].getsockname()[1]
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc):
        async def stop():
            self.server.close()
            for t in list(self._tasks):
                t.cancel()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _client(self, reader, writer):
        self._tasks.add(asyncio.current_task())
        self.accepted.append(time.monotonic())
        up = await asyncio.open_connection(*self.upstream) if self.upstream else None
        down = asyncio.ensure_future(self._down(up[0], writer)) if up else None
        try:
            try:
                while data := await reader.read(65536):   # the client's bytes, at once
                    if up:
                        up[1].write(data)
                        await up[1].drain()
            except ConnectionError:
                pass                                       # a reset is a hang-up too
            self.hung_up.append(time.monotonic())          # EOF or reset: the client closed its connection
        finally:
            if down:
                down.cancel()
            for w in ([up[1]] if up else []) + [writer]:
                w.close()

    async def _down(self, upstream, writer):
        sent = 0
        while data := await upstream.read(65536):
            while data:
                if sent < self.pass_bytes:
                    n = min(len(data), self.pass_bytes - sent)
                elif self.every_s is None:
                    await asyncio.Event().wait()           # stall for good
                else:
                    await asyncio.sleep(self.every_s)
                    n = self.piece
                writer.write(data[:n])
                await writer.drain()
                sent += len(data[:n])
                self.bytes_down += len(data[:n])
                data = data[n:]


def _upstream(url: str) -> tuple[str, int]:
    u = urlparse(url)
    return u.hostname, u.port


def _sse_events(resp) -> list:
    """The SSE events of a streamed chat, decoded; the last is the string "[DONE]"."""
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            body = line[len("data: "):]
            events.append(body if body == "[DONE]" else json.loads(body))
    return events


@pytest.fixture
def short_remote_timeout(served):
    """remote_timeout_s = 3 for one test, on the module's service."""
    remote = served[1].system.remote
    old, remote.timeout = remote.timeout, 3.0
    yield 3.0
    remote.timeout = old


MSGS = [{"role": "user", "content": "Tell me one fact about whales."}]


def _chat(url: str, model: str, stream: bool, **extra) -> tuple[str, dict | None, list, float]:
    """(text, routing info of the plan that ran, SSE events or [], seconds) of one chat over HTTP."""
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": MSGS, "max_tokens": 6, "temperature": 0, "stream": stream, **extra})
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["choices"][0]["message"]["content"], r.json()["moerge"], [], elapsed
    events = _sse_events(r)
    assert events[-1] == "[DONE]", events
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if "choices" in e)
    last = events[-2].get("moerge")            # the last chunk carries the plan that really ran
    return text, last, events, elapsed


@pytest.mark.real
@pytest.mark.slow
def test_a_silent_or_trickling_remote_times_out_within_the_remote_timeout_and_the_base_answers(
        vllm_server, served, short_remote_timeout):
    url, runtime = served
    timeout = short_remote_timeout
    silent = SlowProxy(None)                                             # accepts, reads, never answers
    trickle = SlowProxy(_upstream(vllm_server[0]), every_s=0.5, piece=16)  # never a 3 s gap between bytes
    with silent as silent_url, trickle as trickle_url:
        _register_model(url, "silent-expert", silent_url, "A server that accepts connections and never answers.")
        _register_model(url, "trickle-expert", trickle_url, "A server that answers 16 bytes every half second.")
        for name, proxy in (("silent-expert", silent), ("trickle-expert", trickle)):
            for stream in (False, True):
                n = len(proxy.accepted)
                text, info, events, elapsed = _chat(url, name, stream)
                proxy.wait_for_hang_ups(n + 1, within_s=10)
                assert not any("error" in e for e in events[:-1]), events
                assert text and info["plan"] == "base", info
                assert info["fallback"] == (f"whole-model expert {name!r} did not answer within 3 s "
                                            "(remote_timeout_s); answered by the base model"), info
                # moerge hung up on the remote at the timeout: not before it, not much after it
                assert len(proxy.accepted) == n + 1 and len(proxy.hung_up) == n + 1, (proxy.accepted, proxy.hung_up)
                waited = proxy.hung_up[-1] - proxy.accepted[-1]
                print(f"{name} stream={stream}: hung up after {waited:.2f} s, answered in {elapsed:.2f} s")
                assert timeout - 0.1 <= waited <= timeout + 3, waited
                assert elapsed < waited + 30, elapsed         # then the base model's 6 tokens
        # the trickle kept bytes coming, so only a deadline on the whole answer could stop it
        assert trickle.bytes_down >= 16 * 4, trickle.bytes_down


@pytest.mark.real
@pytest.mark.slow
def test_a_remote_stream_that_stalls_after_its_first_text_ends_with_a_504_error_not_a_hang(
        vllm_server, served, short_remote_timeout):
    url, runtime = served
    stall = SlowProxy(_upstream(vllm_server[0]), pass_bytes=1500)   # headers and a few chunks, then nothing
    with stall as stall_url:
        _register_model(url, "stalling-expert", stall_url, "A server whose stream stops half-way.")
        text, info, events, elapsed = _chat(url, "stalling-expert", True, max_tokens=200, ignore_eos=True)
        # moerge closes the remote connection as it ends the stream; the proxy sees it a moment later
        stall.wait_for_hang_ups(1, within_s=10)
    assert events[0]["moerge"]["plan"] == "remote", events[0]
    errors = [e["error"] for e in events[:-1] if "error" in e]
    assert text and len(errors) == 1, events          # some of the remote's text, then the error, then [DONE]
    assert errors[0]["code"] == "504" and errors[0]["message"] == (
        "whole-model expert 'stalling-expert' sent nothing for 3 s (remote_timeout_s) in the middle of its "
        "answer, which is cut short here: send the request again"), errors
    assert len(stall.accepted) == 1 and len(stall.hung_up) == 1, (stall.accepted, stall.hung_up)
    waited = stall.hung_up[-1] - stall.accepted[-1]
    print(f"stalled stream: {len(text)} characters, then the error; hung up after {waited:.2f} s, {elapsed:.2f} s")
    assert short_remote_timeout <= waited <= short_remote_timeout + 10 and elapsed < waited + 5, (waited, elapsed)


# -- killed: SIGKILL to the server's process group with two requests on it -------------------------------

def _running(remote_url: str) -> float:
    m = re.search(r"^vllm:num_requests_running\{[^}]*\} ([0-9.]+)$", httpx.get(remote_url + "/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.real
@pytest.mark.slow
def test_remote_server_sigkilled_under_two_requests_then_the_base_answers_and_the_pool_keeps_the_expert(
        vllm_server, served, remote_expert):
    url, runtime = served
    remote_url, proc = vllm_server
    before = tree_snapshot(runtime.pool.root, ignore=CHAT_RECORDS)
    names = runtime.pool.names()
    assert remote_expert in names
    plain: dict = {}

    def plain_request():
        plain["result"] = _chat(url, remote_expert, False, max_tokens=100, ignore_eos=True)

    t = threading.Thread(target=plain_request)
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json={
            "model": remote_expert, "messages": MSGS, "max_tokens": 400, "ignore_eos": True,
            "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = []
        for line in lines:                 # up to the remote's first text
            if line.startswith("data: "):
                got.append(json.loads(line[6:]))
                if got[-1]["choices"][0]["delta"].get("content"):
                    break
        t.start()
        deadline = time.monotonic() + 60
        while _running(remote_url) < 2:    # both requests are generating on the remote server
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        rest = [line[6:] for line in lines if line.startswith("data: ")]
        ended = time.monotonic() - killed
    assert got[0]["moerge"]["plan"] == "remote"
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["code"] == "502" and error["message"].startswith(
        "whole-model expert 'remote-expert' stopped in the middle of its answer ("), error
    assert error["message"].endswith("which is cut short here: send the request again, or use another model")
    print(f"stream after the kill: ended in {ended:.2f} s with {error}")
    assert ended < 10, ended                      # no hang: the stream ends when the connection drops
    proc.wait(30)
    t.join(120)
    # the plain request lost its remote half-way: the base model answered it, and says why
    text, info, _, elapsed = plain["result"]
    print(f"plain request across the kill: {elapsed:.2f} s, fallback {info.get('fallback')!r}")
    assert text and info["plan"] == "base" and info["fallback"].startswith("whole-model expert 'remote-expert' failed (")
    assert info["fallback"].endswith("; answered by the base model")
    # after the kill: plain and streamed requests fall back at once (connection refused)
    for stream in (False, True):
        text, info, events, elapsed = _chat(url, remote_expert, stream)
        print(f"after the kill, stream={stream}: {elapsed:.2f} s, fallback {info.get('fallback')!r}")
        assert text and info["plan"] == "base" and "remote-expert" in info["fallback"], info
        assert not any("error" in e for e in events[:-1]), events
    # the pool still holds the expert, byte for byte as before
    assert runtime.pool.names() == names
    assert httpx.get(f"{url}/v1/experts/{remote_expert}").status_code == 200
    assert tree_snapshot(runtime.pool.root, ignore=CHAT_RECORDS) == before
