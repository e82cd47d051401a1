"""Per-key request limits, applied as ASGI middleware before the app reads a request.

- Body size: each key's limit, checked on Content-Length and again while the body arrives (413).
  Expert uploads get room for an adapter; everything else gets `max_request_bytes`.
- Body deadline: the whole body must arrive within `body_timeout_s` (408), so a client that
  trickles bytes cannot hold a worker.
- Open chat responses: at most `max_streams_per_key` per key at once, streamed or not (429).
- Every 429 and 503 carries Retry-After.

A refusal is sent by the middleware itself with the error envelope. If the app was already
running, it then sees a client disconnect, and whatever it sends is dropped. Keys are used
only as in-memory dictionary keys: never logged, never echoed.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import defaultdict

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moerge.config import Settings
from moerge.service.archive import ArchiveLimits
from moerge.service.ops import KeyCheck, same_key

UPLOAD_PATH = "/v1/experts"
STREAM_PATHS = ("/v1/chat/completions",)
MULTIPART_OVERHEAD = 1 << 20


def error_messages(status: int, message: str, headers: dict[str, str] | None = None) -> list[Message]:
    """The ASGI messages of an error response with the OpenAI-style envelope."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": str(status)}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return [{"type": "http.response.start", "status": status, "headers": raw},
            {"type": "http.response.body", "body": body}]


class KeyedLimits:
    """What one key may send and hold open, from the settings."""

    def __init__(self, settings: Settings, keys: KeyCheck):
        self.keys = keys
        self.max_request_bytes = settings.max_request_bytes
        biggest = max(settings.max_upload_bytes, settings.max_esft_upload_bytes)     # LoRA or ESFT adapter
        upload = ArchiveLimits.for_upload(biggest).max_total_bytes + MULTIPART_OVERHEAD
        self.upload_bytes = max(settings.max_request_bytes, upload)
        self.max_streams = settings.max_streams_per_key
        self.body_timeout_s = settings.body_timeout_s
        self._open: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def key_of(self, scope: Scope) -> str:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                return self.keys.bearer(value.decode("latin-1")) or "anonymous"
        return "anonymous"

    def body_bytes(self, key: str, scope: Scope) -> int:
        """Uploads get room for an adapter, but only from a key that may register experts."""
        if scope.get("path") == UPLOAD_PATH and scope.get("method") == "POST":
            if not self.keys.admin or same_key(key, self.keys.admin):
                return self.upload_bytes
        return self.max_request_bytes

    def open_stream(self, key: str) -> bool:
        if self.max_streams <= 0:
            return True
        with self._lock:
            if self._open[key] >= self.max_streams:
                return False
            self._open[key] += 1
            return True

    def close_stream(self, key: str) -> None:
        if self.max_streams <= 0:
            return
        with self._lock:
            self._open[key] -= 1
            if self._open[key] <= 0:
                del self._open[key]       # no memory kept for keys that come and go


class RequestLimits:
    """ASGI middleware enforcing `KeyedLimits` on every HTTP request."""

    def __init__(self, app: ASGIApp, limits: KeyedLimits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limits = self.limits
        key = limits.key_of(scope)
        cap = limits.body_bytes(key, scope)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > cap:
                return await _send_all(send, error_messages(413, f"request body over the limit of {cap} bytes"))
        stream = scope.get("path") in STREAM_PATHS
        if stream and not limits.open_stream(key):
            return await _send_all(send, error_messages(
                429, f"this key already has {limits.max_streams} open chat responses, the limit: wait for one "
                     "to finish", {"Retry-After": "1"}))
        guard = _BodyGuard(receive, send, cap, limits.body_timeout_s)
        try:
            await self.app(scope, guard.receive, guard.send)
        except Exception:
            if not guard.refused:   # after a refusal the app's errors are about the cut-off body
                raise
        finally:
            if stream:
                limits.close_stream(key)


class _BodyGuard:
    """Wraps receive/send of one request: size and deadline on the body, Retry-After on 429/503."""

    def __init__(self, receive: Receive, send: Send, cap: int, timeout_s: float):
        self._receive, self._send = receive, send
        self.cap, self.timeout_s = cap, timeout_s
        self.deadline = asyncio.get_running_loop().time() + timeout_s
        self.seen = 0
        self.body_done = False
        self.started = False
        self.refused = False

    async def receive(self) -> Message:
        if self.refused:
            return {"type": "http.disconnect"}
        if self.body_done:              # e.g. a streaming response listening for a disconnect
            return await self._receive()
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(self._receive(), timeout=max(remaining, 0.0))
        except asyncio.TimeoutError:
            return await self._refuse(408, f"the request body did not arrive within {self.timeout_s:g} s: "
                                           "send it faster, or in smaller pieces")
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.cap:
                return await self._refuse(413, f"request body over the limit of {self.cap} bytes")
            if not message.get("more_body", False):
                self.body_done = True
        return message

    async def send(self, message: Message) -> None:
        if self.refused:
            return
        if message["type"] == "http.response.start":
            self.started = True
            headers = list(message.get("headers", []))
            if message["status"] in (429, 503) and not any(k.lower() == b"retry-after" for k, _ in headers):
                message = {**message, "headers": headers + [(b"retry-after", b"1")]}
        await self._send(message)

    async def _refuse(self, status: int, text: str) -> Message:
        if not self.started:
            self.refused = True
            await _send_all(self._send, error_messages(status, text))
        return {"type": "http.disconnect"}


async def _send_all(send: Send, messages: list[Message]) -> None:
    for m in messages:
        await send(m)
