"""Whole-model experts: served models through LiteLLM, local model folders through transformers.

A remote failure (timeout, connection error, API error) falls back to the base model, and
the plan says so in its notes, so the caller sees which model really answered.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Iterator

from moerge.executors.base import Generation, SamplingParams, StreamDelta

log = logging.getLogger("moerge.remote")


class RemoteModelExecutor:
    name = "litellm"

    def __init__(self, pool, timeout: float = 60.0):
        self.pool = pool
        self.timeout = timeout
        self._local: dict[str, object] = {}
        self._lock = threading.Lock()

    def _kwargs(self, card, messages, params: SamplingParams) -> dict:
        kw = {"model": card.model, "api_base": card.api_base, "messages": messages, "max_tokens": params.max_tokens,
              "temperature": params.temperature, "top_p": params.top_p, "timeout": self.timeout, "num_retries": 0}
        if params.stop:
            kw["stop"] = params.stop
        if params.seed is not None:
            kw["seed"] = params.seed
        key = os.environ.get(card.api_key_env) if card.api_key_env else None
        kw["api_key"] = key or "none"
        return kw

    def _fallback_note(self, plan, card, error: Exception) -> None:
        msg = f"whole-model expert {card.name!r} failed ({type(error).__name__}: {str(error)[:200]}); " \
              "answered by the base model"
        log.warning(msg)
        plan.notes.append(msg)
        plan.decision.detail["fallback"] = "base"

    def _local_model(self, card):
        with self._lock:
            if card.name not in self._local:
                from transformers import AutoModelForCausalLM, AutoTokenizer
                path = card.extra["path"]
                self._local[card.name] = (AutoModelForCausalLM.from_pretrained(path).eval(),
                                          AutoTokenizer.from_pretrained(path))
            return self._local[card.name]

    def _generate_local(self, card, messages, params) -> Generation:
        import torch
        model, tok = self._local_model(card)
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=params.max_tokens, do_sample=params.temperature > 0,
                                 temperature=params.temperature or None, top_p=params.top_p,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        text = tok.decode(new, skip_special_tokens=True)
        finish = "length" if len(new) >= params.max_tokens else "stop"
        return Generation(text, ids["input_ids"].shape[1], len(new), finish)

    def generate(self, messages, params: SamplingParams, plan, fallback) -> Generation:
        card = self.pool.get(plan.decision.chosen[0])
        try:
            if card.extra.get("path"):
                return self._generate_local(card, messages, params)
            import litellm
            resp = litellm.completion(**self._kwargs(card, messages, params))
            choice = resp.choices[0]
            usage = getattr(resp, "usage", None)
            return Generation(choice.message.content or "", getattr(usage, "prompt_tokens", 0) or 0,
                              getattr(usage, "completion_tokens", 0) or 0, choice.finish_reason or "stop")
        except Exception as e:  # noqa: BLE001 - any remote failure falls back, visibly
            self._fallback_note(plan, card, e)
            plan.decision.chosen = []
            plan.decision.abstained = True
            return fallback.generate(messages, params, plan)

    def stream(self, messages, params: SamplingParams, plan, fallback) -> Iterator[StreamDelta]:
        card = self.pool.get(plan.decision.chosen[0])
        if card.extra.get("path"):
            gen = self.generate(messages, params, plan, fallback)
            yield StreamDelta(text=gen.text)
            yield StreamDelta("", gen.finish_reason, gen.prompt_tokens, gen.completion_tokens)
            return
        import litellm
        try:
            chunks = litellm.completion(**self._kwargs(card, messages, params), stream=True,
                                        stream_options={"include_usage": True})
            first = next(iter(chunks), None)
        except Exception as e:  # noqa: BLE001
            self._fallback_note(plan, card, e)
            plan.decision.chosen, plan.decision.abstained = [], True
            yield from fallback.stream(messages, params, plan)
            return
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
