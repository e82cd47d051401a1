"""Worker side of ESFT serving over the shared MoE base (ExpertWeave-style), inside vLLM.

Every MoE layer of the served MoE base keeps vLLM's CPU fused-MoE kernel, over an *extended*
expert table: physical rows 0..M-1 are the base's M experts, rows M.. hold the experts of resident
ESFT adapters: allocated as adapters need them, up to `rows` per layer, then reused. Each resident adapter owns a slot s; each layer has
a remap table [A+1, M] (row 0 the identity, row s+1 the adapter in slot s: its replaced experts
point at their physical rows, the others at themselves).

Per forward the LoRA mapping gives every token its LoRA id; a token whose id is an ESFT plan gets
its adapter's row, any other token row 0. The layer's router is vLLM's `CPURouter` with a
`custom_routing_function`: softmax top-k over the M logical experts, then the remap as one gather
(`moerge.kernels.reroute.route_fused`). Hidden states are never permuted or copied for rerouting,
and requests for different adapters and for the bare base share one batch.

Adapters load when vLLM loads their plan adapter (between forwards, on the engine thread), into
free rows; when a layer's rows or the slots run out, the least recently used adapter that no
running request uses is evicted.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moerge.kernels.reroute import identity_remap, route_fused
from moerge.plan import ExpertRef

ESFT_WEIGHTS = "esft_model.safetensors"
ESFT_CONFIG = "esft_config.json"
GROW_ROWS = 2          # a layer's expert tables grow by at least this many rows at a time


@dataclass
class MoeLayer:
    index: int
    runner: Any                  # vLLM's MoERunner (holds the router)
    experts: Any                 # vLLM's RoutedExperts (holds w13_weight [P, 2I, H] and w2_weight [P, H, I])
    remap: torch.Tensor          # [A+1, M] int32
    free: list[int]              # free physical rows (allocated, holding no adapter's expert)
    isa: str | None              # the CPU kernel's packing ("amx" | "vec"), None when weights are not prepacked
    owner: "MoeRerouting"
    allocated: int = 0           # adapter rows allocated so far (grows on demand up to the engine's `rows`)

    def route(self, hidden_states, gating_output, topk, renormalize):
        rows = self.owner.token_rows
        if rows is not None and rows.shape[0] != gating_output.shape[0]:
            raise RuntimeError(f"moerge MoE rerouting: {gating_output.shape[0]} tokens in layer {self.index} but "
                               f"{rows.shape[0]} in the LoRA mapping; this vLLM layout is not supported")
        return route_fused(gating_output, topk, renormalize, rows, self.remap)


@dataclass
class ResidentAdapter:
    key: str
    name: str
    slot: int
    rows: dict[int, dict[int, int]] = field(default_factory=dict)   # layer -> logical expert -> physical row


def _find_isa(experts) -> str | None:
    """The packing of vLLM's CPU experts object behind this layer (None: zentorch or unpacked)."""
    seen, todo = set(), [experts]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        if hasattr(obj, "isa") and hasattr(obj, "_use_zentorch"):
            return None if obj._use_zentorch else obj.isa
        for attr in ("quant_method", "moe_kernel", "impl", "fused_experts", "experts"):
            child = getattr(obj, attr, None)
            if child is not None and not isinstance(child, torch.Tensor):
                todo.append(child)
    return None


def _layer_index(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


class MoeRerouting:
    """The rerouting tables and resident ESFT adapters of one worker process."""

    def __init__(self):
        self.layers: dict[int, MoeLayer] = {}
        self.n_experts = 0
        self.rows = 0
        self.max_adapters = 0
        self.plans: dict[int, str] = {}                       # LoRA id -> adapter key
        self.resident: OrderedDict[str, ResidentAdapter] = OrderedDict()   # LRU order
        self.free_slots: list[int] = []
        self.row_of_slot: dict[int, int] = {}
        self.token_rows: torch.Tensor | None = None
        self.lock = threading.Lock()
        self.loads = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return bool(self.layers)

    # -- set-up (once, after the engine loaded the model) ----------------------------------
    def setup(self, model, rows: int, max_adapters: int) -> dict:
        """Extend every MoE layer's expert table by `rows` physical rows and install the rerouting router."""
        import importlib
        importlib.import_module("vllm._custom_ops")       # fail here, not at the first adapter load
        if self.layers:
            return self.describe()
        found = []
        for name, mod in model.named_modules():
            if hasattr(mod, "routed_experts") and hasattr(mod, "router") and "layers." in name:
                found.append((name, mod))
        if not found:
            raise RuntimeError("the served model has no fused MoE layers: ESFT adapters need an MoE base")
        self.rows, self.max_adapters = int(rows), int(max_adapters)
        for name, runner in found:
            ex = runner.routed_experts
            M = ex.w13_weight.shape[0]
            self.n_experts = M
            index = _layer_index(name)
            layer = MoeLayer(index, runner, ex, identity_remap(self.max_adapters + 1, M), [], _find_isa(ex), self)
            runner.router.custom_routing_function = layer.route
            self.layers[index] = layer
        self.free_slots = list(range(self.max_adapters))
        return self.describe()

    # -- adapters ---------------------------------------------------------------------------
    def register_plan(self, lora_id: int, ref: ExpertRef) -> None:
        if not self.enabled:
            raise RuntimeError("this engine serves no MoE base: ESFT plans need the MoE engine")
        with self.lock:
            if ref.key not in self.resident:
                self._load(ref)
            self.resident.move_to_end(ref.key)
            self.plans[lora_id] = ref.key

    def _busy(self) -> set[str]:
        return set(self.plans.values())

    def _load(self, ref: ExpertRef) -> None:
        from safetensors.torch import load_file
        folder = Path(ref.adapter_dir)
        experts = {int(k): [int(e) for e in v] for k, v in json.loads((folder / ESFT_CONFIG).read_text())["experts"].items()}
        need = {layer: len(ids) for layer, ids in experts.items()}
        unknown = sorted(set(need) - set(self.layers))
        if unknown:
            raise RuntimeError(f"ESFT adapter {ref.name!r} names layers {unknown} that the MoE base lacks")
        too_many = {layer: n for layer, n in need.items() if n > self.rows}
        if too_many:
            raise RuntimeError(f"ESFT adapter {ref.name!r} replaces {max(too_many.values())} experts in one layer "
                               f"but the engine keeps {self.rows} adapter rows per layer: raise moe_adapter_rows")
        busy = self._busy()
        idle = [r for k, r in self.resident.items() if k not in busy]
        fits = (len(self.free_slots) + len(idle) >= 1 and
                all(self._room(self.layers[layer]) + sum(len(r.rows.get(layer, {})) for r in idle) >= n
                    for layer, n in need.items()))
        if not fits:      # refused before evicting anything
            raise RuntimeError("every adapter row or slot of the MoE engine is used by running requests: "
                               "raise moe_adapter_rows / moe_max_adapters or send fewer distinct ESFT "
                               "adapters at once")
        for layer_idx, n in need.items():          # rows are allocated as adapters need them, up to `rows`
            layer = self.layers[layer_idx]
            if len(layer.free) < n and layer.allocated < self.rows:
                self._grow(layer, min(self.rows - layer.allocated, max(n - len(layer.free), GROW_ROWS)))
        while not self.free_slots or any(len(self.layers[layer].free) < n for layer, n in need.items()):
            self._evict(next(k for k in self.resident if k not in busy))
        tensors = load_file(str(folder / ESFT_WEIGHTS))
        slot = self.free_slots.pop(0)
        res = ResidentAdapter(ref.key, ref.name, slot)
        for layer_idx, ids in experts.items():
            layer = self.layers[layer_idx]
            for e in ids:
                if not 0 <= e < self.n_experts:
                    raise RuntimeError(f"ESFT adapter {ref.name!r}: expert {e} outside 0..{self.n_experts - 1}")
                row = layer.free.pop(0)
                self._write_row(layer, row, tensors, layer_idx, e)
                res.rows.setdefault(layer_idx, {})[e] = row
                layer.remap[slot + 1, e] = row
        self.resident[ref.key] = res
        self.loads += 1

    def _room(self, layer: MoeLayer) -> int:
        """Rows this layer can still give an adapter without evicting: free ones and unallocated ones."""
        return len(layer.free) + self.rows - layer.allocated

    def _grow(self, layer: MoeLayer, k: int) -> None:
        """Add k zero rows to the layer's expert tables (between forwards: the kernel reads the tables
        from the layer at every call)."""
        ex = layer.experts
        w13, w2 = ex.w13_weight.data, ex.w2_weight.data
        P = w13.shape[0]
        new13 = torch.zeros((P + k,) + tuple(w13.shape[1:]), dtype=w13.dtype)
        new2 = torch.zeros((P + k,) + tuple(w2.shape[1:]), dtype=w2.dtype)
        new13[:P].copy_(w13)
        new2[:P].copy_(w2)
        ex.w13_weight = torch.nn.Parameter(new13, requires_grad=False)
        ex.w2_weight = torch.nn.Parameter(new2, requires_grad=False)
        layer.free += list(range(P, P + k))
        layer.allocated += k

    def _write_row(self, layer: MoeLayer, row: int, tensors: dict, layer_idx: int, e: int) -> None:
        from vllm._custom_ops import cpu_prepack_moe_weight
        pre = f"layers.{layer_idx}.experts.{e}"
        w1, w3, w2 = (tensors[f"{pre}.{p}.weight"] for p in ("w1", "w3", "w2"))
        w13_t, w2_t = layer.experts.w13_weight, layer.experts.w2_weight
        inter, padded = w1.shape[0], w13_t.shape[1] // 2
        w13 = torch.zeros((1, 2 * padded, w1.shape[1]), dtype=w13_t.dtype)
        w13[0, :inter] = w1
        w13[0, padded:padded + inter] = w3
        w2p = torch.zeros((1,) + tuple(w2_t.shape[1:]), dtype=w2_t.dtype)
        w2p[0, :, :inter] = w2
        if layer.isa is not None:
            w13, w2p = cpu_prepack_moe_weight(w13, layer.isa), cpu_prepack_moe_weight(w2p, layer.isa)
        w13_t.data[row].copy_(w13[0])
        w2_t.data[row].copy_(w2p[0])

    def _evict(self, key: str) -> None:
        res = self.resident.pop(key)
        for layer_idx, rows in res.rows.items():
            layer = self.layers[layer_idx]
            for e, row in rows.items():
                layer.remap[res.slot + 1, e] = e
                layer.free.append(row)
            layer.free.sort()
        self.free_slots.append(res.slot)
        self.free_slots.sort()
        self.evictions += 1

    def drop_plan(self, lora_id: int) -> bool:
        with self.lock:
            return self.plans.pop(lora_id, None) is not None

    def forget(self, lora_ids: list[int], name: str | None) -> list[str]:
        """Drop these plans, and every resident version of adapter `name` no remaining plan uses."""
        with self.lock:
            for i in lora_ids:
                self.plans.pop(i, None)
            if name is None:
                return []
            busy = self._busy()
            gone = [k for k, r in self.resident.items() if r.name == name and k not in busy]
            for k in gone:
                self._evict(k)
            return gone

    # -- per forward --------------------------------------------------------------------------
    def begin_batch(self, lora_ids: list[int]) -> None:
        """Each token's remap row from its LoRA id (0: the bare base); None when no token has an adapter."""
        if not self.layers:
            return
        with self.lock:
            if not any(i in self.plans for i in lora_ids):
                self.token_rows = None
                return
            slot_row = {i: self.resident[k].slot + 1 for i, k in self.plans.items()}
            self.token_rows = torch.tensor([slot_row.get(i, 0) for i in lora_ids], dtype=torch.long)

    def describe(self) -> dict:
        with self.lock:
            return {"moe_layers": len(self.layers), "logical_experts": self.n_experts, "adapter_rows": self.rows,
                    "max_adapters": self.max_adapters, "resident_adapters": list(self.resident),
                    "free_rows": {i: len(layer.free) for i, layer in self.layers.items()} if self.layers else {},
                    "allocated_rows": {i: layer.allocated for i, layer in self.layers.items()},
                    "plans": len(self.plans), "adapter_loads": self.loads, "adapter_evictions": self.evictions,
                    "isa": next(iter(self.layers.values())).isa if self.layers else None}


MOE = MoeRerouting()
