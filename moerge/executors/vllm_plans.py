"""Worker-side state of the moerge vLLM plugin: which plans exist (by LoRA id), which experts are
resident, and per batch the per-token tables that every adapted layer reads.

A plan reaches the model the way vLLM passes adapters: each request carries a small LoRA
"plan adapter" whose folder holds `moerge_plan.json`; the plugin reads it when vLLM loads the
adapter and keys it by the LoRA id. Per forward, vLLM's LoRA mapping gives every token its
LoRA id, so every token finds its plan. Expert weights and gate vectors are resident here once
(by versioned key), whatever the number of plans that use them.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moerge.executors.expert_weights import LoadedExpert, load_expert
from moerge.experts.joint_gates import module_key
from moerge.plan import ExpertRef

PLAN_FILE = "moerge_plan.json"
DENSE_MAX_RANK = 256   # total resident rank up to which every batch runs over all resident experts
_LAYER_RE = re.compile(r"layers\.(\d+)\.")
# vLLM packs these modules; their slices are the base model's own modules, in this order
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class WorkerPlan:
    lora_id: int
    kind: str                                  # adapter | static_mixture | token_mixture
    experts: list[ExpertRef]
    weights: list[float] = field(default_factory=list)
    mode: str = ""                             # token_mixture: arrow | phatgoose | pooled
    gate_set: str = ""
    bias: list[float] = field(default_factory=list)
    module_bias: dict[str, list[float]] = field(default_factory=dict)   # module key -> per plan expert
    top_k: int = 2
    temperature: float = 1.0
    usage: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [E_plan] routing mass

    @classmethod
    def from_json(cls, lora_id: int, body: dict) -> "WorkerPlan":
        refs = [ExpertRef(e["name"], e["version"], e["adapter_dir"], int(e["rank"]),
                          tuple((g[0], g[1]) for g in e.get("gates", []))) for e in body["experts"]]
        return cls(lora_id, body["kind"], refs, list(body.get("weights", [])), body.get("gate_mode", ""),
                   body.get("gate_set", ""), list(body.get("bias", [])),
                   {k: [float(b) for b in v] for k, v in body.get("module_bias", [])}, int(body.get("top_k", 2)),
                   float(body.get("temperature", 1.0)))

    def layer_usage(self) -> dict[int, dict[str, float]]:
        out = {}
        for layer, mass in sorted(self.usage.items()):
            total = float(mass.sum()) or 1.0
            out[layer] = {e.name: round(float(mass[i]) / total, 4) for i, e in enumerate(self.experts)
                          if float(mass[i]) > 0}
        return out


@dataclass
class ModuleInfo:
    name: str                      # vLLM's module name, e.g. model.layers.3.self_attn.qkv_proj
    slices: tuple[str, ...]        # the base model's module names it computes, in output order
    sizes: tuple[int, ...]
    layer: int
    key: str | None = None         # moerge.experts.joint_gates.module_key: "3.attn"


@dataclass
class PackedTable:
    """One vLLM module's weights for an expert set U: a single shrink and a single expand."""

    w_all_t: torch.Tensor          # [d_in, R + 2·S·E]: every slice's experts' A rows, then per slice
                                   # the arrow and phatgoose gate vectors (transposed, contiguous)
    rank: int                      # R
    w_out: torch.Tensor            # [R, N]: s·Bᵀ, block-diagonal over slices
    owner: torch.Tensor            # [R] expert (index in U) of each rank row
    owner_key: tuple               # equal keys, equal owners (layers of one module kind share it)
    slice_owner: torch.Tensor      # [R] slice·E + expert of each rank row (index into [S·E])
    present: torch.Tensor          # [S, E] bool: the expert adapts this slice
    gsum: torch.Tensor             # [S, E]: Σ of the phatgoose gate (≈0, kept exact)
    n_slices: int
    n_experts: int
    d_in: int

@dataclass
class BatchTables:
    """Per forward: every token's coefficients source, built once and read by every layer."""

    n_tokens: int
    experts: list[str]                         # U: resident keys used by this batch
    fixed: torch.Tensor                        # [T, E] fixed coefficients (adapters, static mixtures)
    token_rows: torch.Tensor                   # [T] bool: gated per token
    phat: torch.Tensor                         # [T] bool: phatgoose mode (else arrow)
    bias: torch.Tensor                         # [T, E] float32; -inf where the plan does not allow the expert
    k: torch.Tensor                            # [T] long
    temperature: torch.Tensor                  # [T, 1]
    plan_of_token: torch.Tensor                # [T] long index into `plans` (P = none)
    plans: list[WorkerPlan]
    plan_cols: list[torch.Tensor]              # per plan: index in U of each of its experts
    kmax: int
    any_token: bool
    tokw: torch.Tensor | None = None           # [T] weight of the per-token gate logits (0: pooled plans)
    usage: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [P+1, E]
    fixed_rank: dict[tuple, torch.Tensor] = field(default_factory=dict)  # owner key -> fixed[:, owner] in dtype
    _module_bias: dict[str, torch.Tensor | None] = field(default_factory=dict)

    def module_bias(self, key: str | None) -> torch.Tensor | None:
        """[T, E]: every token's plan's bias at this module (None when no plan in the batch has one)."""
        if self.tokw is None or key is None:
            return None
        if key not in self._module_bias:
            P, E = len(self.plans), len(self.experts)
            full = torch.zeros(P + 1, E)
            for j, p in enumerate(self.plans):
                if p.module_bias:
                    v = p.module_bias.get(key)
                    full[j, self.plan_cols[j]] = (torch.tensor(v, dtype=torch.float32) if v is not None
                                                  else torch.full((len(self.plan_cols[j]),), float("-inf")))
            self._module_bias[key] = full[self.plan_of_token]
        return self._module_bias[key]


class PluginState:
    """The plugin's tables in one worker process (one model per process)."""

    def __init__(self, capacity: int | None = None, dtype: str | None = None):
        # the executor passes these to the engine process through its environment
        self.capacity = capacity or int(os.environ.get("MOERGE_PLUGIN_CAPACITY", "64"))
        self.dtype = getattr(torch, dtype or os.environ.get("MOERGE_PLUGIN_DTYPE", "float32"))
        self.modules: dict[int, ModuleInfo] = {}           # id(lora_a_stacked) -> module
        self.plans: dict[int, WorkerPlan] = {}
        self.resident: OrderedDict[str, LoadedExpert] = OrderedDict()   # LRU order
        self.slot: dict[str, int] = {}                                  # stable position of each resident expert
        self._next_slot = 0
        self._tables: OrderedDict[tuple, dict[str, PackedTable]] = OrderedDict()
        self.batch: BatchTables | None = None
        self.lock = threading.Lock()
        self.loads = 0
        self.evictions = 0
        # glibc keeps the heap pages a forward frees (oneDNN primitives for each new batch shape, plan
        # tables); every trim_every_s seconds they go back to the system (0: never)
        self.trim_every_s = float(os.environ.get("MOERGE_WORKER_TRIM_S", "10"))
        self._last_trim = time.monotonic()
        self.trims = 0
        self.trim_ms = 0.0

    # -- registration (engine-core thread, between forwards) ------------------------------
    def register_module(self, name: str, module) -> None:
        short = name.rsplit(".", 1)[-1]
        prefix = name.rsplit(".", 1)[0]
        slices = tuple(f"{prefix}.{s}" for s in PACKED.get(short, (short,)))
        sizes = tuple(int(s) for s in getattr(module, "output_slices", ()) or ())
        m = _LAYER_RE.search(name)
        self.modules[id(module.lora_a_stacked)] = ModuleInfo(name, slices, sizes, int(m.group(1)) if m else -1,
                                                             module_key(name))

    def register_plan_folder(self, lora_id: int, folder: str) -> bool:
        path = Path(folder) / PLAN_FILE
        if not path.is_file():
            return False
        plan = WorkerPlan.from_json(lora_id, json.loads(path.read_text()))
        if plan.kind == "esft":      # served by rerouting inside the MoE layers, not by the LoRA tables
            from moerge.executors.vllm_moe import MOE
            MOE.register_plan(lora_id, plan.experts[0])
            return True
        with self.lock:
            for ref in plan.experts:
                self._make_resident(ref, keep={r.key for r in plan.experts})
            self.plans[lora_id] = plan
        return True

    def _make_resident(self, ref: ExpertRef, keep: set[str]) -> None:
        if ref.key in self.resident:
            self.resident.move_to_end(ref.key)
            return
        busy = keep | {r.key for p in self.plans.values() for r in p.experts}
        while len(self.resident) >= self.capacity:
            victim = next((k for k in self.resident if k not in busy), None)
            if victim is None:
                raise RuntimeError(f"more than {self.capacity} experts are in use at once: raise "
                                   "max_resident_experts or send fewer distinct experts per batch")
            self._evict(victim)
        self.resident[ref.key] = load_expert(ref)
        self.slot[ref.key] = self._next_slot
        self._next_slot += 1
        self.loads += 1

    def _evict(self, key: str) -> None:
        del self.resident[key]
        del self.slot[key]
        self.evictions += 1
        self._tables.clear()

    def forget(self, lora_ids: list[int], name: str | None) -> dict:
        """Drop these plans, and every resident version of expert `name` that no remaining plan uses."""
        with self.lock:
            self._fold_usage()
            plans = [self.plans.pop(i) for i in lora_ids if i in self.plans]
            experts = []
            if name is not None:
                busy = {r.key for p in self.plans.values() for r in p.experts}
                experts = [k for k, ex in self.resident.items() if ex.ref.name == name and k not in busy]
                for k in experts:
                    self._evict(k)
            return {"plans": len(plans), "experts": experts}

    def drop_plan(self, lora_id: int) -> WorkerPlan | None:
        with self.lock:
            self._fold_usage()
            return self.plans.pop(lora_id, None)

    # -- per forward -----------------------------------------------------------------------
    def maybe_trim(self) -> None:
        now = time.monotonic()
        if self.trim_every_s > 0 and now - self._last_trim >= self.trim_every_s:
            from moerge.executors.memory import malloc_trim
            malloc_trim()
            self._last_trim = time.monotonic()
            self.trims += 1
            self.trim_ms += (self._last_trim - now) * 1000

    def begin_batch(self, lora_ids: list[int]) -> BatchTables | None:
        """Build the per-token tables for a forward from each token's LoRA id (0 = none)."""
        self.maybe_trim()
        with self.lock:
            self._fold_usage()
            order: dict[int, int] = {}
            for i in lora_ids:
                if i in self.plans and i not in order:
                    order[i] = len(order)
            if not order:
                self.batch = None
                return None
            plans = [self.plans[i] for i in order]
            refs: dict[str, ExpertRef] = {r.key: r for p in plans for r in p.experts}
            experts = self._expert_set(refs)
            col = {k: j for j, k in enumerate(experts)}
            P, E = len(plans), len(experts)
            fixed = torch.zeros(P + 1, E)
            bias = torch.full((P + 1, E), float("-inf"))
            token = torch.zeros(P + 1, dtype=torch.bool)
            phat = torch.zeros(P + 1, dtype=torch.bool)
            k = torch.ones(P + 1, dtype=torch.long)
            temp = torch.ones(P + 1)
            tokw = torch.ones(P + 1)
            plan_cols = []
            for j, p in enumerate(plans):
                cols = torch.tensor([col[r.key] for r in p.experts], dtype=torch.long)
                plan_cols.append(cols)
                if p.kind == "token_mixture":
                    token[j], phat[j] = True, p.mode == "phatgoose"
                    b = torch.tensor(p.bias if p.bias else [0.0] * len(cols), dtype=torch.float32)
                    bias[j, cols] = b
                    k[j], temp[j] = p.top_k, p.temperature
                    tokw[j] = 0.0 if p.mode == "pooled" else 1.0
                else:
                    fixed[j].index_add_(0, cols, torch.tensor(p.weights, dtype=torch.float32))
            tok = torch.tensor([order.get(i, P) for i in lora_ids], dtype=torch.long)
            self.batch = BatchTables(
                n_tokens=len(lora_ids), experts=experts, fixed=fixed[tok], token_rows=token[tok],
                phat=phat[tok], bias=bias[tok], k=k[tok], temperature=temp[tok].unsqueeze(1), plan_of_token=tok,
                plans=plans, plan_cols=plan_cols, kmax=int(k[:P][token[:P]].max()) if bool(token.any()) else 1,
                any_token=bool(token.any()),
                tokw=tokw[tok] if any(p.module_bias for p in plans) else None)
            return self.batch

    def _expert_set(self, needed: dict) -> list[str]:
        """The experts a batch's shrink/expand runs over, in stable slot order (so the packed tables
        are reused from step to step): every resident expert while their total rank is small (two
        matmuls beat gathering a subset), else only the ones this batch's plans use."""
        keys = list(self.resident) if self._total_rank() <= DENSE_MAX_RANK else list(needed)
        return sorted(keys, key=self.slot.__getitem__)

    def _total_rank(self) -> int:
        return sum(ex.ref.rank for ex in self.resident.values())

    def _fold_usage(self) -> None:
        """Move the last forward's routing mass into each plan's per-layer totals."""
        b = self.batch
        if b is None or not b.usage:
            return
        for layer, mass in b.usage.items():
            for j, p in enumerate(b.plans):
                if p.kind != "token_mixture" or p.lora_id not in self.plans:
                    continue
                add = mass[j, b.plan_cols[j]]
                p.usage[layer] = p.usage.get(layer, 0) + add
        b.usage = {}

    def table(self, info: ModuleInfo, batch: BatchTables) -> PackedTable:
        key = tuple(batch.experts)
        per_module = self._tables.get(key)
        if per_module is None:
            per_module = self._tables[key] = {}
            while len(self._tables) > 8:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        if info.name not in per_module:
            per_module[info.name] = self._build_table(info, [self.resident[k] for k in batch.experts])
        return per_module[info.name]

    def _build_table(self, info: ModuleInfo, experts: list[LoadedExpert]) -> PackedTable:
        E, S = len(experts), len(info.slices)
        rows, outs, owners, slice_owner, present, gsum, gates = [], [], [], [], [], [], []
        n_total, col, d_in = sum(info.sizes), 0, None
        for s, (s_name, size) in enumerate(zip(info.slices, info.sizes)):
            for j, ex in enumerate(experts):
                if s_name in ex.a:
                    a, sb = ex.a[s_name], ex.sb[s_name]
                    d_in = a.shape[1]
                    rows.append(a)
                    block = torch.zeros(a.shape[0], n_total)
                    block[:, col:col + size] = sb.T
                    outs.append(block)
                    owners += [j] * a.shape[0]
                    slice_owner += [s * E + j] * a.shape[0]
            present.append([s_name in ex.a for ex in experts])
            ga = [ex.gates.get("arrow", {}).get(s_name) for ex in experts]
            gp = [ex.gates.get("gate", {}).get(s_name) for ex in experts]
            gates.append((ga, gp))
            gsum.append([float(g.sum()) if g is not None else 0.0 for g in gp])
            col += size
        if d_in is None:
            d_in = next((g.shape[0] for ga, gp in gates for g in ga + gp if g is not None), 1)
        blocks = [torch.cat(rows) if rows else torch.zeros(0, d_in)]
        for ga, gp in gates:
            for group in (ga, gp):
                blocks.append(torch.stack([g if g is not None else torch.zeros(d_in) for g in group])
                              if E else torch.zeros(0, d_in))
        dt = self.dtype
        return PackedTable(w_all_t=torch.cat(blocks).T.to(dt).contiguous(), rank=len(owners),
                           w_out=(torch.cat(outs) if outs else torch.zeros(0, n_total)).to(dt).contiguous(),
                           owner=torch.tensor(owners, dtype=torch.long), owner_key=(S, E, tuple(owners)),
                           slice_owner=torch.tensor(slice_owner, dtype=torch.long),
                           present=torch.tensor(present, dtype=torch.bool).view(S, E),
                           gsum=torch.tensor(gsum, dtype=torch.float32).view(S, E), n_slices=S, n_experts=E,
                           d_in=d_in)

    def describe(self) -> dict:
        with self.lock:
            return {"resident_experts": [k for k in self.resident], "capacity": self.capacity,
                    "plans": len(self.plans), "expert_loads": self.loads, "expert_evictions": self.evictions,
                    "malloc_trims": self.trims, "malloc_trim_ms": round(self.trim_ms, 1),
                    # as this worker process was started with it (moerge sets it: Settings.vllm_onednn_cache)
                    "onednn_primitive_cache": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
                    "torch_lru_cache": os.environ.get("LRU_CACHE_CAPACITY")}


STATE = PluginState()
