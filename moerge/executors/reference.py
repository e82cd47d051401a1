"""Reference executor: every LoRA plan (base, one adapter, static and token mixtures, dense
deltas) runs in the routed transformers engine (moerge/executors/routed.py), one request at a time.

It is the plain and obvious oracle the vLLM executor is checked against, and the engine for
TIES (dense-delta) plans.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from moerge.executors.routed import RoutedEngine
from moerge.models.generation import Generation, SamplingParams, StreamDelta
from moerge.plan import EngineCaps, ExecutionPlan


class ReferenceExecutor:
    name = "reference"

    def __init__(self, model_dir: Path, dtype: torch.dtype = torch.float32):
        self.engine = RoutedEngine.from_folder(model_dir, dtype)
        self.tokenizer = self.engine.tok

    def ready(self) -> bool:
        return True

    def caps(self) -> EngineCaps:
        return EngineCaps("reference")

    def forget(self, name: str) -> None:
        self.engine.forget(name)

    def describe(self) -> dict:
        return {"engine": "reference", "ready": True, "resident_experts": list(self.engine._experts)}

    def complete(self, messages: list[dict], max_tokens: int) -> str:
        return self.generate(messages, SamplingParams(max_tokens=max_tokens), ExecutionPlan("base")).text

    def stream(self, messages: list[dict], params: SamplingParams, plan: ExecutionPlan) -> Iterator[StreamDelta]:
        prompt = self.engine.encode_chat(messages)
        it = self.engine.iter_batch([prompt], [plan], params)
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
        yield StreamDelta(text="", finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
                          completion_tokens=len(result.tokens), layer_usage=result.layer_usage)

    def generate(self, messages: list[dict], params: SamplingParams, plan: ExecutionPlan) -> Generation:
        return self.engine.generate(messages, params, plan)

    def generate_many(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                      plans: list[ExecutionPlan], batch_size: int = 16) -> list[Generation]:
        """Rows in batches of `batch_size` (rows with equal sampling parameters together), each row
        under its own plan; params: one, or one per prompt."""
        per = params if isinstance(params, list) else [params] * len(prompts)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(per):
            groups.setdefault((p.max_tokens, p.temperature, p.top_p, tuple(p.stop), p.seed, p.ignore_eos), []).append(i)
        out: list[Generation | None] = [None] * len(prompts)
        for idx in groups.values():
            for j in range(0, len(idx), batch_size):
                chunk = idx[j:j + batch_size]
                rows = [plans[i] for i in chunk]        # row plans are made under the engine's lock
                for i, r in zip(chunk, self.engine.generate_batch([prompts[i] for i in chunk], rows, per[chunk[0]])):
                    out[i] = Generation(r.text, r.prompt_tokens, len(r.tokens), r.finish_reason,
                                        layer_usage=r.layer_usage, token_ids=list(r.tokens))
        return out  # type: ignore[return-value]


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
