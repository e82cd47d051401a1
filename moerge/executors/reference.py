"""Reference executor: the base model in transformers with a hand-written decode loop.

Simple on purpose: prefill, then one token at a time with the KV cache. It is the ground
truth the vLLM executor is checked against, and where token-level plans run until they
run inside vLLM.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from moerge.executors.base import Generation, SamplingParams, StreamDelta


class ReferenceExecutor:
    name = "reference"

    def __init__(self, model_dir: Path, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).eval()
        self.eos_ids = self._eos_ids()
        self._lock = threading.Lock()

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end >= 0:
            ids.add(im_end)
        return {i for i in ids if i is not None}

    def encode_chat(self, messages: list[dict]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)
        return list(out["input_ids"])

    def _next_token(self, logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
        if params.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < params.top_p
            probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
        return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))

    def token_stream(self, prompt_ids: list[int], params: SamplingParams,
                     model: torch.nn.Module | None = None) -> Iterator[int]:
        """Yield generated token ids (eos excluded) until eos or max_tokens."""
        model = model or self.model
        gen = torch.Generator().manual_seed(params.seed if params.seed is not None else 0)
        ids = torch.tensor([prompt_ids])
        past = None
        with torch.inference_mode():
            for _ in range(params.max_tokens):
                out = model(input_ids=ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = self._next_token(out.logits[0, -1], params, gen)
                if tok in self.eos_ids:
                    return
                yield tok
                ids = torch.tensor([[tok]])

    def stream(self, messages: list[dict], params: SamplingParams, plan=None,
               model: torch.nn.Module | None = None) -> Iterator[StreamDelta]:
        prompt = self.encode_chat(messages)
        with self._lock:
            tokens: list[int] = []
            sent = ""
            finish = "length"
            for tok in self.token_stream(prompt, params, model):
                tokens.append(tok)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if text.endswith("\ufffd"):
                    continue  # an incomplete multi-byte character: wait for the rest
                cut = _first_stop(text, params.stop)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                if len(text) > len(sent):
                    yield StreamDelta(text=text[len(sent):])
                    sent = text
                if cut is not None:
                    break
            else:
                finish = "length" if len(tokens) >= params.max_tokens else "stop"
            yield StreamDelta(text="", finish_reason=finish, prompt_tokens=len(prompt),
                              completion_tokens=len(tokens))

    def generate(self, messages: list[dict], params: SamplingParams, plan=None,
                 model: torch.nn.Module | None = None) -> Generation:
        parts, last = [], None
        for delta in self.stream(messages, params, plan, model):
            parts.append(delta.text)
            last = delta
        return Generation(text="".join(parts), prompt_tokens=last.prompt_tokens,
                          completion_tokens=last.completion_tokens, finish_reason=last.finish_reason)


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
