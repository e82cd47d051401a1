"""Reference executor: every plan (base, one adapter, merges, token-level mixtures) runs in the
routed transformers engine (moerge/executors/routed.py), one request at a time.

It is the ground truth the vLLM executor is checked against, and where token-level plans
run until they run inside vLLM.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from moerge.executors.base import Generation, SamplingParams, StreamDelta
from moerge.executors.routed import RoutedEngine


class ReferenceExecutor:
    name = "reference"

    def __init__(self, model_dir: Path, pool, dtype: torch.dtype = torch.float32):
        self.engine = RoutedEngine.from_folder(model_dir, pool, dtype)
        self.tokenizer = self.engine.tok

    def ready(self) -> bool:
        return True

    def stream(self, messages: list[dict], params: SamplingParams, plan=None) -> Iterator[StreamDelta]:
        decision = plan.decision if plan is not None else None
        router = plan.router if plan is not None else None
        prompt = self.engine.encode_chat(messages)
        row = self.engine.row_plan(decision, router)
        it = self.engine.iter_batch([prompt], [row], params)
        tokens: list[int] = []
        sent = ""
        try:
            while True:
                try:
                    accepted = next(it)
                except StopIteration as stop:
                    result = stop.value[0]
                    break
                tokens += [t for _, t in accepted]
                text = _visible(self.tokenizer.decode(tokens, skip_special_tokens=True), params.stop)
                if len(text) > len(sent):
                    yield StreamDelta(text=text[len(sent):])
                    sent = text
        finally:
            it.close()
        if len(result.text) > len(sent):
            yield StreamDelta(text=result.text[len(sent):])
        if decision is not None and result.layer_usage:
            decision.layer_usage = result.layer_usage
        yield StreamDelta(text="", finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
                          completion_tokens=len(result.tokens))

    def generate(self, messages: list[dict], params: SamplingParams, plan=None) -> Generation:
        decision = plan.decision if plan is not None else None
        router = plan.router if plan is not None else None
        gen, _ = self.engine.generate(messages, params, decision, router)
        return gen


def _visible(text: str, stops: list[str]) -> str:
    """What can be sent now: cut at a stop sequence, hold back an incomplete character and any
    tail that could still grow into a stop sequence."""
    for s in stops:
        if s and s in text:
            text = text[:text.find(s)]
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[:len(text) - hold]
