"""Whole-model experts: served models through LiteLLM, local model folders through transformers.

A failure (timeout, connection error, API error) raises `RemoteModelError`; the caller turns it
into a base-model plan with the reason (moerge.plan.fallback_plan), so the answer says which
model really answered.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Iterator

from moerge.models.chat import encode_chat
from moerge.models.generation import Generation, SamplingParams, StreamDelta
from moerge.plan import EngineCaps, ExecutionPlan, RemoteTarget

log = logging.getLogger("moerge.remote")


class RemoteModelError(RuntimeError):
    """A whole-model expert did not answer."""


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
        key = os.environ.get(t.api_key_env) if t.api_key_env else None
        kw["api_key"] = key or "none"
        return kw

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
            import litellm
            resp = litellm.completion(**self._kwargs(t, messages, params))
            choice = resp.choices[0]
            usage = getattr(resp, "usage", None)
            return Generation(choice.message.content or "", getattr(usage, "prompt_tokens", 0) or 0,
                              getattr(usage, "completion_tokens", 0) or 0, choice.finish_reason or "stop")
        except Exception as e:  # noqa: BLE001 - any remote failure is reported as one error type
            raise RemoteModelError(f"whole-model expert {t.name!r} failed ({type(e).__name__}: {str(e)[:200]})") from e

    def stream(self, messages, params: SamplingParams, plan: ExecutionPlan) -> Iterator[StreamDelta]:
        """Raises RemoteModelError before the first delta when the model cannot be reached."""
        t = plan.remote
        if t.path:
            gen = self.generate(messages, params, plan)
            yield StreamDelta(text=gen.text)
            yield StreamDelta("", gen.finish_reason, gen.prompt_tokens, gen.completion_tokens)
            return
        import litellm
        try:
            chunks = litellm.completion(**self._kwargs(t, messages, params), stream=True,
                                        stream_options={"include_usage": True})
            first = next(iter(chunks), None)
        except Exception as e:  # noqa: BLE001
            raise RemoteModelError(f"whole-model expert {t.name!r} failed ({type(e).__name__}: {str(e)[:200]})") from e
        finish, n_prompt, n_out = "stop", 0, 0
        for chunk in itertools.chain([first] if first is not None else [], chunks):
            if getattr(chunk, "usage", None):
                n_prompt = chunk.usage.prompt_tokens or 0
                n_out = chunk.usage.completion_tokens or 0
            if chunk.choices:
                delta = chunk.choices[0].delta
                if getattr(delta, "content", None):
                    yield StreamDelta(text=delta.content)
                finish = chunk.choices[0].finish_reason or finish
        yield StreamDelta("", finish, n_prompt, n_out)
