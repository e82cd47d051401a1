"""Keys are compared in constant time and never logged, the admin key is separate, per-key limits
answer 429 with Retry-After, and CORS is off unless origins are listed."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx
import pytest
import uvicorn

from moerge.config import Settings
from moerge.service import ops
from moerge.service.limits import KeyedLimits, RequestLimits
from moerge.service.ops import AuthError, ForbiddenError, KeyCheck
from tests.service.test_openai_client import free_port

USER_KEY, ADMIN_KEY, WRONG_KEY = "user-SECRET-7f3a91", "admin-SECRET-c0ffee", "wrong-SECRET-deadbe"
CHAT = {"model": "base", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


def _settings(tmp_path, **kw) -> Settings:
    return Settings(home=tmp_path, bundled_pool=False, admin_key=ADMIN_KEY, api_keys=[USER_KEY], **kw)


def test_keys_are_compared_in_constant_time(tmp_path, monkeypatch):
    calls = []
    real = ops.hmac.compare_digest
    monkeypatch.setattr(ops.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    keys = KeyCheck(_settings(tmp_path))
    assert keys.user(f"Bearer {USER_KEY}") == USER_KEY
    keys.admin_call(f"Bearer {ADMIN_KEY}")
    assert (USER_KEY.encode(), USER_KEY.encode()) in calls and (ADMIN_KEY.encode(), ADMIN_KEY.encode()) in calls


def test_the_admin_key_is_separate_from_user_keys(tmp_path):
    keys = KeyCheck(_settings(tmp_path))
    with pytest.raises(ForbiddenError, match="use the admin key"):
        keys.admin_call(f"Bearer {USER_KEY}")
    for header in (None, f"Bearer {WRONG_KEY}", f"Basic {ADMIN_KEY}", f"Bearer {ADMIN_KEY[:-1]}"):
        with pytest.raises(AuthError) as info:
            keys.admin_call(header)
        assert ADMIN_KEY not in info.value.message and WRONG_KEY not in info.value.message
    keys.admin_call(f"Bearer {ADMIN_KEY}")


# -- per-key limits, on a stand-in app whose chat answer waits until released -----------------------

def _limited_app(tmp_path, **kw):
    release = asyncio.Event()

    async def app(scope, receive, send):
        if scope["path"] == "/v1/chat/completions":
            await release.wait()
        status = 503 if scope["path"] == "/busy" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    s = _settings(tmp_path, **kw)
    return RequestLimits(app, KeyedLimits(s, KeyCheck(s))), release


def test_a_key_with_too_many_open_chat_responses_gets_429_with_retry_after(tmp_path):
    async def run():
        app, release = _limited_app(tmp_path, max_streams_per_key=2)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            def chat(key):
                return client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"})
            held = [asyncio.create_task(chat(USER_KEY)) for _ in range(2)]
            other = asyncio.create_task(chat(ADMIN_KEY))        # another key has its own budget
            await asyncio.sleep(0.2)
            assert not other.done() and not any(t.done() for t in held)     # all three are open
            try:                                                 # a third one must not wait: it is refused
                refused = await asyncio.wait_for(chat(USER_KEY), 10)
            finally:
                release.set()
            codes = [(await t).status_code for t in (*held, other)]
            again = await chat(USER_KEY)                         # the slots were given back
        return refused, codes, again

    refused, codes, again = asyncio.run(run())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    err = refused.json()["error"]
    assert err["code"] == "429" and "2 open chat responses" in err["message"]
    assert USER_KEY not in refused.text
    assert codes == [200, 200, 200] and again.status_code == 200


def test_every_429_and_503_carries_retry_after(tmp_path):
    async def run():
        app, _ = _limited_app(tmp_path)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get("/busy")
    resp = asyncio.run(run())
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"


# -- the real app -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runtime(real_settings, tmp_path_factory):
    from moerge.service.factory import build_runtime
    s = real_settings.model_copy(update={"pool_dir": tmp_path_factory.mktemp("sec-pool"), "admin_key": ADMIN_KEY,
                                         "api_keys": [USER_KEY], "routing_method": "embed",
                                         "max_request_bytes": 2**20})
    return build_runtime(s, progress=lambda m: None)


def _app(runtime, **changes):
    from moerge.service.app import create_app
    settings = runtime.settings
    runtime.settings = settings.model_copy(update=changes)
    try:
        return create_app(runtime)
    finally:
        runtime.settings = settings


def _client(app) -> httpx.Client:
    return httpx.Client(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def _get(app, path, **kw):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.request(kw.pop("method", "GET"), path, **kw)


@pytest.mark.real
def test_cors_is_off_by_default(runtime):
    app = _app(runtime)
    origin = {"Origin": "https://ui.example"}
    plain = asyncio.run(_get(app, "/v1/models", headers=origin))
    preflight = asyncio.run(_get(app, "/v1/chat/completions", method="OPTIONS", headers={
        **origin, "Access-Control-Request-Method": "POST"}))
    assert plain.status_code == 200
    for resp in (plain, preflight):
        assert not [h for h in resp.headers if h.startswith("access-control-")], resp.headers
    assert preflight.status_code == 405 and preflight.json()["error"]["code"] == "405"


@pytest.mark.real
def test_cors_allows_only_the_listed_origins(runtime):
    app = _app(runtime, cors_origins=["https://ui.example"])
    listed = asyncio.run(_get(app, "/v1/models", headers={"Origin": "https://ui.example"}))
    other = asyncio.run(_get(app, "/v1/models", headers={"Origin": "https://evil.example"}))
    preflight = asyncio.run(_get(app, "/v1/chat/completions", method="OPTIONS", headers={
        "Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"}))
    assert listed.headers["access-control-allow-origin"] == "https://ui.example"
    assert "access-control-allow-origin" not in other.headers
    assert preflight.status_code == 200 and "POST" in preflight.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in preflight.headers


@pytest.mark.real
def test_rate_limited_key_gets_429_with_retry_after(runtime):
    app = _app(runtime, rate_limit_per_minute=2)
    route = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
    auth = {"Authorization": f"Bearer {USER_KEY}"}
    codes = [asyncio.run(_get(app, "/v1/route", method="POST", json=route, headers=auth)) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert 1 <= int(codes[2].headers["retry-after"]) <= 61
    assert codes[2].json()["error"]["code"] == "429" and "rate limit" in codes[2].json()["error"]["message"]
    other = asyncio.run(_get(app, "/v1/route", method="POST", json=route,
                             headers={"Authorization": f"Bearer {ADMIN_KEY}"}))
    assert other.status_code == 200                    # the limit is per key


class _LoudServer:
    """uvicorn with its access log on and every logger propagating, so caplog sees all of it."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                                    log_level="debug", access_log=True))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.mark.real
def test_no_key_appears_in_any_log_line_on_success_or_error_paths(runtime, caplog, capfd, monkeypatch):
    for name in ("moerge", "uvicorn", "uvicorn.access", "uvicorn.error", "fastapi", "starlette"):
        caplog.set_level(logging.DEBUG, logger=name)
    app = _app(runtime, rate_limit_per_minute=6)
    user, admin, wrong = ({"Authorization": f"Bearer {k}"} for k in (USER_KEY, ADMIN_KEY, WRONG_KEY))
    with _LoudServer(app) as url:
        def call(method, path, **kw):
            return httpx.request(method, url + path, timeout=120, **kw).status_code

        codes = [
            call("POST", "/v1/chat/completions", json=CHAT, headers=user),
            call("POST", "/v1/chat/completions", json=CHAT, headers=wrong),
            call("POST", "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Basic {USER_KEY}"}),
            call("POST", "/v1/chat/completions", json={**CHAT, "model": "nobody"}, headers=user),
            call("POST", "/v1/chat/completions", content=b"x" * (2**20 + 1), headers=user),
            call("POST", "/v1/experts", json={"kind": "model", "name": "r"}, headers=user),
            call("POST", "/v1/experts", content=b"x", headers={**admin, "content-type": "text/plain"}),
            call("POST", "/v1/experts", headers=admin, json={
                "kind": "model", "name": "r", "model": "openai/x", "api_base": "http://127.0.0.1:9/v1",
                "api_key_env": WRONG_KEY}),
            call("DELETE", "/v1/experts/ghost", headers=admin),
            call("GET", f"/no/such/route?key={WRONG_KEY}", headers=user),
        ]
        codes += [call("POST", "/v1/route", json=CHAT, headers=user) for _ in range(6)]
        monkeypatch.setattr(runtime.pool, "list", lambda: 1 / 0)    # an unexpected error, logged with its traceback
        codes.append(call("GET", "/v1/experts", headers=admin))
    assert codes[:10] == [200, 401, 401, 404, 413, 403, 415, 400, 404, 404], codes
    assert 429 in codes[10:16] and codes[-1] == 500, codes
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert '"status": 401' in logged and "ZeroDivisionError" in logged and "/v1/experts" in logged
    for key in (USER_KEY, ADMIN_KEY, WRONG_KEY):
        assert key not in logged, f"a key was logged:\n{[ln for ln in logged.splitlines() if key in ln]}"
