"""How a whole-model expert's failures are told apart: a timeout (504) from any other break (502).

LiteLLM wraps transport errors in its own classes, several deep; a timeout must be found at any depth.
The first case is the chain CI saw when a stream stalled (the test expecting 504 got 502)."""
from __future__ import annotations

import os

import aiohttp
import pytest

from moerge.executors.remote import RemoteModelExecutor, RemoteStreamTimeoutError, _timed_out
from moerge.plan import RemoteTarget

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
from litellm.exceptions import APIConnectionError, MidStreamFallbackError  # noqa: E402


def _wrapped(inner: BaseException) -> BaseException:
    """inner, wrapped the way litellm wraps a stream that broke mid-way (message and original_exception)."""
    conn = APIConnectionError(f"APIConnectionError: OpenAIException - {inner}", "openai", "m")
    conn.__cause__ = inner
    return MidStreamFallbackError(f"litellm.APIConnectionError: {conn}", model="m", llm_provider="openai",
                                  original_exception=conn)


def test_a_socket_timeout_under_two_litellm_wrappers_is_a_timeout():
    assert _timed_out(_wrapped(aiohttp.SocketTimeoutError("Timeout on reading data from socket")))


def test_a_timeout_kept_only_in_original_exception_is_found():
    conn = APIConnectionError("connection trouble", "openai", "m")
    conn.__cause__ = aiohttp.ServerTimeoutError("x")
    outer = MidStreamFallbackError("stream broke", model="m", llm_provider="openai", original_exception=conn)
    assert "timeout" not in str(outer).lower()
    assert _timed_out(outer)


@pytest.mark.parametrize("inner", [ConnectionResetError("Connection reset by peer"),
                                   aiohttp.ServerDisconnectedError("Server disconnected")])
def test_a_broken_connection_is_not_a_timeout(inner):
    assert not _timed_out(_wrapped(inner))


def test_a_stalled_stream_becomes_a_504_and_a_reset_a_502():
    ex = RemoteModelExecutor(timeout=3)
    t = RemoteTarget(name="e", model="openai/m", api_base="http://127.0.0.1:1/v1")
    stalled = ex._broken(t, _wrapped(aiohttp.SocketTimeoutError("Timeout on reading data from socket")))
    reset = ex._broken(t, _wrapped(ConnectionResetError("Connection reset by peer")))
    assert isinstance(stalled, RemoteStreamTimeoutError) and stalled.status == 504
    assert "sent nothing for 3 s" in str(stalled)
    assert not isinstance(reset, RemoteStreamTimeoutError) and reset.status == 502
