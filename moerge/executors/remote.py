"""Whole-model experts: served models through LiteLLM, local model folders through transformers.

A failure before any text went out (a timeout, a refused or dropped connection, an API error)
raises `RemoteModelError`; the caller turns it into a base-model plan with the reason
(moerge.plan.fallback_plan), so the answer says which model really answered. A stream that breaks
after text went out cannot fall back: it raises `RemoteStreamError` (502; 504 for a timeout), which
the service sends in-band before `[DONE]`.

`timeout` (the `remote_timeout_s` setting) bounds the whole answer on the async path the service
uses (`agenerate`), and the wait for each chunk of a stream (`astream`, `stream`). The sync
`generate` (CLI, evaluation) bounds each network wait, so a server that trickles bytes can take longer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Iterator

from moerge.experts.errors import ExpertError
from moerge.models.chat import encode_chat
from moerge.models.generation import Generation, SamplingParams, StreamDelta
from moerge.plan import EngineCaps, ExecutionPlan, RemoteTarget

log = logging.getLogger("moerge.remote")


class RemoteModelError(RuntimeError):
    """A whole-model expert did not answer, and nothing was sent yet: the base model answers instead."""


class RemoteStreamError(ExpertError):
    """A whole-model expert's stream broke after part of the answer went out."""
    status = 502


class RemoteStreamTimeoutError(RemoteStreamError):
    """A whole-model expert's stream stalled past the timeout after part of the answer went out."""
    status = 504


def _litellm():
    """litellm, imported without fetching its model price list from the network (4 s or more)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm
    return litellm


_TIMEOUT_NAMES = ("Timeout", "APITimeoutError", "ReadTimeout", "TimeoutException", "ServerTimeoutError",
                  "SocketTimeoutError", "ConnectionTimeoutError")


def _timed_out(e: BaseException) -> bool:
    """Whether `e`, or anything it wraps, is a timeout.

    LiteLLM wraps transport errors in its own (`MidStreamFallbackError` around `APIConnectionError`
    around aiohttp's `SocketTimeoutError`, for one), sometimes only as text, so the chain of causes,
    `original_exception` attributes and the messages are all looked at."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, TimeoutError) or type(x).__name__ in _TIMEOUT_NAMES:
            return True
        text = str(x).lower()
        if "timed out" in text or "timeout on reading" in text or "read timeout" in text:
            return True
        todo += [x.__cause__, x.__context__, getattr(x, "original_exception", None)]
    return False


class RemoteModelExecutor:
    name = "remote"

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout
        self._local: dict[str, object] = {}
        self._lock = threading.Lock()

    def ready(self) -> bool:
        return True

    def caps(self) -> EngineCaps:
        return EngineCaps("remote", kinds=frozenset({"remote"}))

    def describe(self) -> dict:
        return {"engine": "remote", "ready": True, "local_models": sorted(self._local)}

    def _kwargs(self, t: RemoteTarget, messages, params: SamplingParams) -> dict:
        kw = {"model": t.model, "api_base": t.api_base, "messages": messages, "max_tokens": params.max_tokens,
              "temperature": params.temperature, "top_p": params.top_p, "timeout": self.timeout, "num_retries": 0}
        if params.stop:
            kw["stop"] = params.stop
        if params.seed is not None:
            kw["seed"] = params.seed
        if params.ignore_eos:      # vLLM's extension, asked for by the client: pass it on
            kw["extra_body"] = {"ignore_eos": True}
        key = os.environ.get(t.api_key_env) if t.api_key_env else None
        kw["api_key"] = key or "none"
        return kw

    def _failed(self, t: RemoteTarget, e: BaseException) -> RemoteModelError:
        if _timed_out(e):
            return RemoteModelError(f"whole-model expert {t.name!r} did not answer within {self.timeout:g} s "
                                    "(remote_timeout_s)")
        return RemoteModelError(f"whole-model expert {t.name!r} failed ({type(e).__name__}: {str(e)[:200]})")

    def _broken(self, t: RemoteTarget, e: BaseException) -> RemoteStreamError:
        if _timed_out(e):
            return RemoteStreamTimeoutError(
                f"whole-model expert {t.name!r} sent nothing for {self.timeout:g} s (remote_timeout_s) in the "
                "middle of its answer, which is cut short here: send the request again")
        return RemoteStreamError(f"whole-model expert {t.name!r} stopped in the middle of its answer "
                                 f"({type(e).__name__}: {str(e)[:200]}), which is cut short here: send the "
                                 "request again, or use another model")

    @staticmethod
    def _generation(resp) -> Generation:
        choice = resp.choices[0]
        usage = getattr(resp, "usage", None)
        return Generation(choice.message.content or "", getattr(usage, "prompt_tokens", 0) or 0,
                          getattr(usage, "completion_tokens", 0) or 0, choice.finish_reason or "stop")

    def _local_model(self, t: RemoteTarget):
        with self._lock:
            if t.path not in self._local:
                from transformers import AutoModelForCausalLM, AutoTokenizer
                self._local[t.path] = (AutoModelForCausalLM.from_pretrained(t.path).eval(),
                                       AutoTokenizer.from_pretrained(t.path))
            return self._local[t.path]

    def _generate_local(self, t: RemoteTarget, messages, params) -> Generation:
        import torch
        model, tok = self._local_model(t)
        ids = torch.tensor([encode_chat(tok, messages)])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens,
                                 do_sample=params.temperature > 0, temperature=params.temperature or None,
                                 top_p=params.top_p, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        new = out[0, ids.shape[1]:]
        text = tok.decode(new, skip_special_tokens=True)
        finish = "length" if len(new) >= params.max_tokens else "stop"
        return Generation(text, ids.shape[1], len(new), finish)

    def generate(self, messages, params: SamplingParams, plan: ExecutionPlan) -> Generation:
        t = plan.remote
        try:
            if t.path:
                return self._generate_local(t, messages, params)
            return self._generation(_litellm().completion(**self._kwargs(t, messages, params)))
        except Exception as e:  # noqa: BLE001 - any remote failure is reported as one error type
            raise self._failed(t, e) from e

    async def agenerate(self, messages, params: SamplingParams, plan: ExecutionPlan) -> Generation:
        """The whole answer within `timeout`; past it the request is cancelled (its connection closed)."""
        t = plan.remote
        if t.path:
            return await asyncio.to_thread(self.generate, messages, params, plan)
        litellm = await asyncio.to_thread(_litellm)      # the first import takes seconds: not on the event loop
        try:
            async with asyncio.timeout(self.timeout):
                resp = await litellm.acompletion(**self._kwargs(t, messages, params))
        except Exception as e:  # noqa: BLE001 - any remote failure is reported as one error type
            raise self._failed(t, e) from e
        return self._generation(resp)

    def stream(self, messages, params: SamplingParams, plan: ExecutionPlan) -> Iterator[StreamDelta]:
        """Raises RemoteModelError while no text has been yielded, RemoteStreamError after."""
        t = plan.remote
        if t.path:
            gen = self.generate(messages, params, plan)
            yield StreamDelta(text=gen.text)
            yield StreamDelta("", gen.finish_reason, gen.prompt_tokens, gen.completion_tokens)
            return
        try:
            chunks = iter(_litellm().completion(**self._kwargs(t, messages, params), stream=True,
                                             stream_options={"include_usage": True}))
        except Exception as e:  # noqa: BLE001
            raise self._failed(t, e) from e
        acc = _Chunks()
        while True:
            try:
                chunk = next(chunks, None)
            except Exception as e:  # noqa: BLE001
                raise (self._broken(t, e) if acc.sent else self._failed(t, e)) from e
            if chunk is None:
                break
            yield from acc.deltas(chunk)
        yield acc.last()

    async def astream(self, messages, params: SamplingParams, plan: ExecutionPlan) -> AsyncIterator[StreamDelta]:
        """The first chunk, and each next one, within `timeout`. Raises RemoteModelError while no text has
        been yielded, RemoteStreamError after. Closing this generator closes the remote stream."""
        t = plan.remote
        if t.path:
            gen = await self.agenerate(messages, params, plan)
            yield StreamDelta(text=gen.text)
            yield StreamDelta("", gen.finish_reason, gen.prompt_tokens, gen.completion_tokens)
            return
        litellm = await asyncio.to_thread(_litellm)
        chunks = None
        acc = _Chunks()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.timeout):
                        if chunks is None:
                            chunks = await litellm.acompletion(**self._kwargs(t, messages, params), stream=True,
                                                               stream_options={"include_usage": True})
                        chunk = await anext(chunks, None)
                except Exception as e:  # noqa: BLE001
                    raise (self._broken(t, e) if acc.sent else self._failed(t, e)) from e
                if chunk is None:
                    break
                for delta in acc.deltas(chunk):
                    yield delta
            yield acc.last()
        finally:
            if chunks is not None:
                await chunks.aclose()


class _Chunks:
    """OpenAI stream chunks as deltas, with the finish reason and usage seen so far."""

    def __init__(self):
        self.sent, self.finish, self.n_prompt, self.n_out = False, "stop", 0, 0

    def deltas(self, chunk) -> Iterator[StreamDelta]:
        if getattr(chunk, "usage", None):
            self.n_prompt = chunk.usage.prompt_tokens or 0
            self.n_out = chunk.usage.completion_tokens or 0
        if chunk.choices:
            delta = chunk.choices[0].delta
            if getattr(delta, "content", None):
                self.sent = True
                yield StreamDelta(text=delta.content)
            self.finish = chunk.choices[0].finish_reason or self.finish

    def last(self) -> StreamDelta:
        return StreamDelta("", self.finish, self.n_prompt, self.n_out)
