"""The reference engine with experts: the base model in transformers, every adapted linear
replaced by a RoutedLoraLinear holding the pool's LoRA experts stacked, and a batched
decode loop where each row carries its own routing plan.

No peft at run time. Batching uses left padding with explicit position ids, so a row's
tokens do not depend on which other rows share its batch.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from moerge.executors.expert_weights import LoadedExpert, load_expert
from moerge.executors.routed_layer import BatchState, RoutedLoraLinear, RowPlan
from moerge.kernels.merge import MERGES
from moerge.models.chat import encode_chat, stop_token_ids
from moerge.models.generation import Generation, SamplingParams
from moerge.plan import ExecutionPlan, PlanError

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


@dataclass
class RowResult:
    tokens: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    layer_usage: dict[int, dict[str, float]]


class RoutedEngine:
    def __init__(self, model, tokenizer, dtype: torch.dtype = torch.float32, capacity: int = 256):
        self.model = model.to(dtype).eval()
        self.tok = tokenizer
        self.dtype = dtype
        self.state = BatchState()
        self.layers: dict[str, RoutedLoraLinear] = {}
        self.expert_names: list[str] = []
        self.capacity = capacity
        self._experts: OrderedDict[str, LoadedExpert] = OrderedDict()
        self._forgotten: set[str] = set()     # names removed from the pool, dropped at the next planning
        self._index: dict[str, int] = {}
        self._dense_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._gate_cache: dict[tuple, dict] = {}
        self._lock = threading.RLock()       # expert tables
        self._gen_lock = threading.Lock()    # one decode at a time (released from any thread)
        self.eos_ids = set(stop_token_ids(tokenizer))

    @classmethod
    def from_folder(cls, base_dir, dtype=torch.float32) -> "RoutedEngine":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        return cls(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), AutoTokenizer.from_pretrained(base_dir),
                   dtype)

    # -- experts ------------------------------------------------------------------
    def _ensure_layer(self, module: str) -> RoutedLoraLinear:
        if module not in self.layers:
            parent_name, child = module.rsplit(".", 1)
            parent = self.model.get_submodule(parent_name)
            m = _LAYER_RE.search(module)
            layer = RoutedLoraLinear(getattr(parent, child), module, int(m.group(1)) if m else -1, self.state)
            setattr(parent, child, layer)
            self.layers[module] = layer
        return self.layers[module]

    def _resident(self, refs) -> dict[str, int]:
        """Stack index of each expert (by versioned key), loading the plans' experts that are new.

        Experts stay resident until `capacity` is reached; then the least recently used ones
        that the current plans do not need are dropped (their stack is rebuilt once)."""
        with self._lock:
            needed = {r.key: r for r in refs}
            gone = [k for k, ex in self._experts.items() if ex.ref.name in self._forgotten and k not in needed]
            self._forgotten.clear()
            for k in gone:
                del self._experts[k]
            new = [r for k, r in needed.items() if k not in self._experts]
            for k in needed:
                if k in self._experts:
                    self._experts.move_to_end(k)
            for r in new:
                self._experts[r.key] = load_expert(r)
            if new:
                while len(self._experts) > self.capacity:
                    victim = next((k for k in self._experts if k not in needed), None)
                    if victim is None:
                        raise PlanError(f"the plans need more than {self.capacity} experts at once")
                    del self._experts[victim]
            if new or gone:
                self._restack()
            return self._index

    def forget(self, name: str) -> None:
        """Expert `name` left the pool: its resident versions are dropped when the next batch is planned
        (never under a running one, whose rows index the current stack)."""
        with self._lock:
            self._forgotten.add(name)
            self._dense_cache.clear()

    def _restack(self) -> None:
        experts = list(self._experts.values())
        modules = sorted({m for ex in experts for m in ex.a})
        E = len(experts)
        for m in modules:
            layer = self._ensure_layer(m)
            r = max(ex.rank(m) for ex in experts)
            a = torch.zeros(E, r, layer.base.in_features, dtype=self.dtype)
            b = torch.zeros(E, layer.base.out_features, r, dtype=self.dtype)
            for e, ex in enumerate(experts):
                if m in ex.a:
                    a[e, :ex.rank(m)] = ex.a[m].to(self.dtype)
                    b[e, :, :ex.rank(m)] = ex.sb[m].to(self.dtype)
            layer.set_experts(a, b, torch.ones(E, dtype=self.dtype))
        for m, layer in self.layers.items():
            if m not in modules:
                layer.set_experts(layer.a[:0], layer.b[:0], layer.scaling[:0])
        self.expert_names = [ex.ref.name for ex in experts]
        self._index = {k: i for i, k in enumerate(self._experts)}

    def _dense_delta(self, plan: ExecutionPlan) -> dict[str, torch.Tensor]:
        """module -> merged dense update of the plan's experts (TIES), cached by plan."""
        sig = plan.signature()
        with self._lock:
            if sig not in self._dense_cache:
                fn = MERGES[f"merge-{plan.merge}"]
                experts = [load_expert(r) for r in plan.experts]
                modules = sorted({m for ex in experts for m in ex.a})
                self._dense_cache[sig] = {m: fn([ex.sb[m] @ ex.a[m] for ex in experts if m in ex.a]).to(self.dtype)
                                          for m in modules}
                for m in modules:          # a dense plan may be the first to touch these modules
                    self._ensure_layer(m)
                while len(self._dense_cache) > 4:
                    self._dense_cache.pop(next(iter(self._dense_cache)))
            return self._dense_cache[sig]

    def _gates(self, plan: ExecutionPlan) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module -> (positions in the plan's experts of those that adapt it, their gate vectors)."""
        key = (plan.gate_set, tuple(r.key for r in plan.experts))
        with self._lock:
            if key not in self._gate_cache:
                tables = [(self._experts.get(r.key) or load_expert(r)).gates.get(plan.gate_set, {})
                          for r in plan.experts]
                modules = sorted(set().union(*(set(t) for t in tables))) if tables else []
                out = {}
                for m in modules:
                    have = [i for i, t in enumerate(tables) if m in t]
                    out[m] = (torch.tensor(have), torch.stack([tables[i][m] for i in have]))
                self._gate_cache = {key: out}
            return self._gate_cache[key]

    # -- plans ----------------------------------------------------------------------
    def row_plan(self, plan: ExecutionPlan | None) -> RowPlan:
        if plan is None or plan.kind == "base":
            return RowPlan("base")
        if plan.kind == "dense_delta":
            return RowPlan("dense", dense=self._dense_delta(plan))
        index = self._resident(plan.experts)
        ids = [index[r.key] for r in plan.experts]
        if plan.kind in ("adapter", "static_mixture"):
            return RowPlan("fixed", ids=ids, weights=list(plan.weights))
        if plan.kind == "token_mixture":
            pooled = plan.gate_mode == "pooled"
            return RowPlan("token", mode=plan.gate_mode, eligible=ids, bias=list(plan.bias), top_k=plan.top_k,
                           temperature=plan.temperature, gates=None if pooled else self._gates(plan),
                           module_bias={k: list(v) for k, v in plan.module_bias})
        raise PlanError(f"the reference engine does not run {plan.kind} plans")

    # -- generation ---------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        return encode_chat(self.tok, messages)

    def generate_batch(self, prompts: list[list[int]], plans: list, params: SamplingParams) -> list[RowResult]:
        """Greedy (or seeded sampling) decode of a batch; each row follows its own plan."""
        it = self.iter_batch(prompts, plans, params)
        while True:
            try:
                next(it)
            except StopIteration as stop:
                return stop.value

    def iter_batch(self, prompts: list[list[int]], plans: list, params: SamplingParams):
        """Decode step by step: yields the list of (row, token) accepted at each step and
        returns the RowResults. Holds the generation lock until exhausted or closed. `plans` may be
        execution plans: they become row plans under the lock, so no other request restacks the
        experts between a row's plan and its decode."""
        with self._gen_lock:
            todo = [p for p in plans if not isinstance(p, RowPlan) and p is not None]
            # every row's experts resident first, in one restack: a later row's new expert must not
            # move the stack under an earlier row's indices
            self._resident([r for p in todo if p.kind not in ("base", "dense_delta") for r in p.experts])
            plans = [p if isinstance(p, RowPlan) else self.row_plan(p) for p in plans]
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

    def generate(self, messages: list[dict], params: SamplingParams, plan: ExecutionPlan | None = None) -> Generation:
        prompt = self.encode_chat(messages)
        r = self.generate_batch([prompt], [plan], params)[0]
        return Generation(r.text, r.prompt_tokens, len(r.tokens), r.finish_reason, layer_usage=r.layer_usage,
                          token_ids=list(r.tokens))


def _cut_stop(text: str, stops: list[str]) -> str:
    hits = [text.find(s) for s in stops or [] if s and s in text]
    return text[:min(hits)] if hits else text
