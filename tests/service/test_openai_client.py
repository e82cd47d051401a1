"""The first service answers the official openai client with the real base model."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def base_server(real_settings):
    from moerge.service.app import create_app
    from moerge.service.factory import build_runtime
    runtime = build_runtime(real_settings, progress=lambda m: None)
    with ServerThread(create_app(runtime)) as url:
        yield url


@pytest.mark.real
def test_openai_client_gets_paris_from_smollm2(base_server):
    from openai import OpenAI
    client = OpenAI(base_url=base_server + "/v1", api_key="unused")
    resp = client.chat.completions.create(model="base", max_tokens=24, temperature=0,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in resp.choices[0].message.content
    assert resp.usage.completion_tokens > 0 and resp.usage.prompt_tokens > 0
    assert resp.choices[0].finish_reason in ("stop", "length")


@pytest.mark.real
def test_openai_client_streams(base_server):
    from openai import OpenAI
    client = OpenAI(base_url=base_server + "/v1", api_key="unused")
    stream = client.chat.completions.create(model="base", max_tokens=24, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": "What is the capital of France?"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.real
def test_health_models_and_bad_requests(base_server):
    assert httpx.get(base_server + "/healthz").json() == {"status": "ok"}
    ids = [m["id"] for m in httpx.get(base_server + "/v1/models").json()["data"]]
    assert ids[:2] == ["auto", "base"]
    r = httpx.post(base_server + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "invalid request" in r.json()["error"]["message"]
    r = httpx.post(base_server + "/v1/chat/completions", json={"model": "base", "messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(base_server + "/v1/chat/completions",
                   json={"model": "no-such-expert", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and "no-such-expert" in r.json()["error"]["message"]
