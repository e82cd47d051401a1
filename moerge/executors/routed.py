"""The reference engine with experts: the base model in transformers, every adapted linear
replaced by a RoutedLoraLinear holding the pool's LoRA experts stacked, and a batched
decode loop where each row carries its own routing plan.

No peft at run time. Batching uses left padding with explicit position ids, so a row's
tokens do not depend on which other rows share its batch.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import torch

from moerge.executors.base import Generation, SamplingParams
from moerge.executors.routed_layer import BatchState, RoutedLoraLinear, RowPlan
from moerge.router.base import RoutingDecision
from moerge.router.merge import MERGES

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


@dataclass
class RowResult:
    tokens: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    layer_usage: dict[int, dict[str, float]]


class RoutedEngine:
    def __init__(self, model, tokenizer, pool, dtype: torch.dtype = torch.float32):
        self.model = model.to(dtype).eval()
        self.tok = tokenizer
        self.pool = pool
        self.dtype = dtype
        self.state = BatchState()
        self.layers: dict[str, RoutedLoraLinear] = {}
        self.expert_names: list[str] = []
        self._version = None
        self._dense_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._lock = threading.RLock()       # expert tables
        self._gen_lock = threading.Lock()    # one decode at a time (released from any thread)
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.eos_ids = {i for i in (tokenizer.eos_token_id, im_end) if isinstance(i, int) and i >= 0}
        pool.on_change(lambda event, name: self._invalidate())

    @classmethod
    def from_folder(cls, base_dir, pool, dtype=torch.float32) -> "RoutedEngine":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        return cls(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), AutoTokenizer.from_pretrained(base_dir),
                   pool, dtype)

    # -- experts ------------------------------------------------------------------
    def _invalidate(self) -> None:
        with self._lock:
            self._version = None
            self._dense_cache.clear()

    def _ensure_layer(self, module: str) -> RoutedLoraLinear:
        if module not in self.layers:
            parent_name, child = module.rsplit(".", 1)
            parent = self.model.get_submodule(parent_name)
            m = _LAYER_RE.search(module)
            layer = RoutedLoraLinear(getattr(parent, child), module, int(m.group(1)) if m else -1, self.state)
            setattr(parent, child, layer)
            self.layers[module] = layer
        return self.layers[module]

    def sync_experts(self) -> list[str]:
        """Stack every LoRA expert of the pool into the routed layers (once per pool change:
        the pool's change events reset the version, so requests in between do not read the pool)."""
        if self._version is not None:
            return self.expert_names
        with self._lock:
            cards = [c for c in self.pool.list() if c.kind == "lora"]
            version = tuple((c.name, c.artifacts.get("adapter_weights")) for c in cards)
            if version == self._version:
                return self.expert_names
            from moerge.experts.lora import load_lora
            adapters = [load_lora(self.pool.adapter_dir(c), self.pool.base_spec) for c in cards]
            modules = sorted({m for ad in adapters for m in ad.weights})
            for m in modules:
                layer = self._ensure_layer(m)
                r = max(ad.weights[m][0].shape[0] for ad in adapters if m in ad.weights)
                E = len(adapters)
                a = torch.zeros(E, r, layer.base.in_features, dtype=self.dtype)
                b = torch.zeros(E, layer.base.out_features, r, dtype=self.dtype)
                s = torch.zeros(E, dtype=self.dtype)
                for e, ad in enumerate(adapters):
                    if m in ad.weights:
                        ae, be = ad.weights[m]
                        a[e, :ae.shape[0]] = ae.to(self.dtype)
                        b[e, :, :be.shape[1]] = be.to(self.dtype)
                        s[e] = ad.scaling[m]
                layer.set_experts(a, b, s)
            for m, layer in self.layers.items():
                if m not in modules:
                    layer.set_experts(layer.a[:0], layer.b[:0], layer.scaling[:0])
            self.expert_names = [c.name for c in cards]
            self._adapters = {c.name: ad for c, ad in zip(cards, adapters)}
            self._version = version
            return self.expert_names

    def dense_merge(self, method: str) -> dict[str, torch.Tensor]:
        """module -> merged dense update for a merge baseline (cached until the pool changes)."""
        with self._lock:
            if method not in self._dense_cache:
                self.sync_experts()
                fn = MERGES[method]
                modules = sorted({m for ad in self._adapters.values() for m in ad.weights})
                out = {}
                for m in modules:
                    deltas = [ad.delta(m) for ad in self._adapters.values() if m in ad.weights]
                    out[m] = fn(deltas).to(self.dtype)
                self._dense_cache[method] = out
            return self._dense_cache[method]

    # -- plans ----------------------------------------------------------------------
    def row_plan(self, decision: RoutingDecision | None, router=None) -> RowPlan:
        names = self.sync_experts()
        index = {n: i for i, n in enumerate(names)}
        if decision is None or decision.abstained or not decision.chosen:
            return RowPlan("base")
        if decision.granularity == "sequence":
            missing = [n for n in decision.chosen if n not in index]
            if missing:
                raise KeyError(f"expert(s) {missing} are not LoRA experts loaded in this engine")
            return RowPlan("fixed", ids=[index[n] for n in decision.chosen], weights=[1.0] * len(decision.chosen))
        if decision.granularity == "static":
            merge = decision.method
            if merge == "merge-ties":
                return RowPlan("dense", dense=self.dense_merge(merge))
            n = len(names)
            w = 1.0 / n if merge == "merge-linear" else 1.0
            return RowPlan("fixed", ids=list(range(n)), weights=[w] * n)
        if decision.granularity == "token":
            if router is None:
                raise ValueError("a token-level plan needs its router (for the gate vectors)")
            eligible = [n for n in decision.chosen if n in index]
            return RowPlan("token", mode=router.mode, eligible=[index[n] for n in eligible],
                           bias=[decision.bias.get(n, 0.0) for n in eligible] if decision.bias else [],
                           top_k=router.top_k, temperature=router.temperature, gates=router.module_gates(eligible))
        raise ValueError(f"unknown granularity {decision.granularity!r}")

    # -- generation ---------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])

    def generate_batch(self, prompts: list[list[int]], plans: list[RowPlan], params: SamplingParams) -> list[RowResult]:
        """Greedy (or seeded sampling) decode of a batch; each row follows its own plan."""
        it = self.iter_batch(prompts, plans, params)
        while True:
            try:
                next(it)
            except StopIteration as stop:
                return stop.value

    def iter_batch(self, prompts: list[list[int]], plans: list[RowPlan], params: SamplingParams):
        """Decode step by step: yields the list of (row, token) accepted at each step and
        returns the RowResults. Holds the generation lock until exhausted or closed."""
        with self._gen_lock:
            self.sync_experts()
            B = len(prompts)
            width = max(map(len, prompts))
            pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
            ids = torch.full((B, width), pad)
            mask = torch.zeros(B, width, dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            for p in plans:
                p.usage = {}
            gens = [torch.Generator().manual_seed(params.seed if params.seed is not None else 0) for _ in range(B)]
            out_tokens: list[list[int]] = [[] for _ in range(B)]
            done = [False] * B
            finish = ["length"] * B
            past = None
            step_ids = ids
            try:
                for _ in range(params.max_tokens):
                    self.state.rows = plans
                    self.state.counted = mask[:, -step_ids.shape[1]:].bool() & ~torch.tensor(done).unsqueeze(1)
                    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
                    with torch.inference_mode():
                        out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=pos,
                                         past_key_values=past, use_cache=True)
                    self.state.rows, self.state.counted = [], None
                    past = out.past_key_values
                    logits = out.logits[:, -1].float()
                    nxt, accepted = [], []
                    for i in range(B):
                        tok = self._pick(logits[i], params, gens[i])
                        if not done[i]:
                            if tok in self.eos_ids and not params.ignore_eos:
                                done[i], finish[i] = True, "stop"
                            else:
                                out_tokens[i].append(tok)
                                accepted.append((i, tok))
                                if params.stop and self._hit_stop(out_tokens[i], params.stop):
                                    done[i], finish[i] = True, "stop"
                        nxt.append(tok)
                    yield accepted
                    if all(done):
                        break
                    step_ids = torch.tensor(nxt).unsqueeze(1)
                    mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
            finally:
                self.state.rows, self.state.counted = [], None
            results = []
            for i in range(B):
                text = _cut_stop(self.tok.decode(out_tokens[i], skip_special_tokens=True), params.stop)
                results.append(RowResult(out_tokens[i], text, finish[i], len(prompts[i]), self._usage(plans[i])))
            return results

    def _usage(self, plan: RowPlan) -> dict[int, dict[str, float]]:
        out = {}
        for layer, mass in sorted(plan.usage.items()):
            total = float(mass.sum()) or 1.0
            out[layer] = {n: round(float(mass[i]) / total, 4) for i, n in enumerate(self.expert_names)
                          if float(mass[i]) > 0}
        return out

    @staticmethod
    def _pick(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
        if params.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sp, idx = probs.sort(descending=True)
            keep = sp.cumsum(0) - sp < params.top_p
            probs = torch.zeros_like(probs).scatter(0, idx[keep], sp[keep])
        return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))

    def _hit_stop(self, tokens: list[int], stops: list[str]) -> bool:
        tail = self.tok.decode(tokens[-16:], skip_special_tokens=True)
        return any(s and s in tail for s in stops)

    def generate(self, messages: list[dict], params: SamplingParams, decision=None, router=None) -> tuple[Generation, RowResult]:
        prompt = self.encode_chat(messages)
        r = self.generate_batch([prompt], [self.row_plan(decision, router)], params)[0]
        if decision is not None and r.layer_usage:
            decision.layer_usage = r.layer_usage
        return Generation(r.text, r.prompt_tokens, len(r.tokens), r.finish_reason), r


def _cut_stop(text: str, stops: list[str]) -> str:
    hits = [text.find(s) for s in stops or [] if s and s in text]
    return text[:min(hits)] if hits else text
