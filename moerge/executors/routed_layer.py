"""RoutedLoraLinear: a linear layer that applies, per token, a weighted mixture of LoRA experts.

y = W x + Σ_{e ∈ top-k} w_e · s_e · B_e A_e x, where the weights come from the row's plan:
none (base), fixed experts with fixed weights (one adapter, or a linear/cat merge), a dense
delta (TIES), or token-level gating (moerge.kernels.gating) over the row's eligible experts
with the row's bias. Rows never see each other's plans: routing is per token, per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moerge.kernels.gating import route_tokens
from moerge.kernels.lora_mixture import (
    DENSE_MAX_TOTAL_RANK, coefficients, lora_mixture_dense, lora_mixture_grouped, stack_for_dense,
)


@dataclass
class RowPlan:
    kind: str = "base"                       # "base" | "fixed" | "token" | "dense"
    ids: list[int] = field(default_factory=list)       # fixed: expert indices
    weights: list[float] = field(default_factory=list)  # fixed: their weights
    mode: str = ""                           # token: "arrow" | "phatgoose"
    eligible: list[int] = field(default_factory=list)   # token: expert indices allowed
    bias: list[float] = field(default_factory=list)     # token: per eligible expert
    top_k: int = 2
    temperature: float = 1.0
    gates: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # token: module -> (positions in eligible, [E_m, d_in])
    dense: dict[str, torch.Tensor] | None = None        # dense: module -> [d_out, d_in]
    usage: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [E] mass (token rows)


class BatchState:
    """The plans of the rows in the current forward; shared by every routed layer of a model."""

    def __init__(self):
        self.rows: list[RowPlan] = []
        self.row_of_token: torch.Tensor | None = None   # [T] row index of each flattened token
        self.record_usage = True


class RoutedLoraLinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, name: str, layer: int, state: BatchState):
        super().__init__()
        self.base = base
        self.name = name
        self.layer = layer
        self.state = state
        self.a = torch.zeros(0, 0, base.in_features)    # [E, r, d_in]
        self.b = torch.zeros(0, base.out_features, 0)   # [E, d_out, r]
        self.scaling = torch.zeros(0)                   # [E]
        self.dense, self.a_cat, self.b_cat = True, None, None

    def set_experts(self, a: torch.Tensor, b: torch.Tensor, scaling: torch.Tensor) -> None:
        self.a, self.b, self.scaling = a, b, scaling
        # few experts × small rank: two matmuls over the concatenated rank beat per-expert segments
        self.dense = a.shape[0] * a.shape[1] <= DENSE_MAX_TOTAL_RANK
        self.a_cat, self.b_cat = stack_for_dense(a, b, scaling) if self.dense and len(a) else (None, None)

    def _mixture(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.dense:
            coef = coefficients(weights, ids, self.a.shape[0])
            return lora_mixture_dense(x, self.a_cat.to(x.dtype), self.b_cat.to(x.dtype), coef, self.a.shape[1])
        return lora_mixture_grouped(x, self.a, self.b, self.scaling, weights, ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.state.rows
        if not rows or all(r.kind == "base" for r in rows):
            return y
        shape = x.shape
        xt = x.reshape(-1, shape[-1])                               # [T, d_in]
        T = xt.shape[0]
        per_row = T // len(rows)
        delta = torch.zeros(T, self.base.out_features, dtype=xt.dtype)
        kmax = max([len(r.ids) for r in rows if r.kind == "fixed"] + [r.top_k for r in rows if r.kind == "token"] + [1])
        weights = torch.zeros(T, kmax, dtype=torch.float32)
        ids = torch.zeros(T, kmax, dtype=torch.long)
        any_lora = False
        for i, row in enumerate(rows):
            sl = slice(i * per_row, (i + 1) * per_row)
            if row.kind == "fixed" and row.ids:
                n = len(row.ids)
                ids[sl, :n] = torch.tensor(row.ids)
                weights[sl, :n] = torch.tensor(row.weights)
                any_lora = True
            elif row.kind == "token" and row.gates is not None and self.name in row.gates:
                pos, gates = row.gates[self.name]
                bias = torch.tensor(row.bias, dtype=torch.float32)[pos].expand(per_row, -1) if row.bias else None
                w, local, _ = route_tokens(xt[sl], gates, row.mode, row.top_k, bias, row.temperature)
                k = w.shape[1]
                ids[sl, :k] = torch.tensor(row.eligible)[pos][local]
                weights[sl, :k] = w
                any_lora = True
                if self.state.record_usage:
                    mass = torch.zeros(len(self.scaling)).scatter_add_(0, ids[sl, :k].reshape(-1), w.reshape(-1))
                    row.usage[self.layer] = row.usage.get(self.layer, 0) + mass
            elif row.kind == "dense" and row.dense is not None and self.name in row.dense:
                delta[sl] += xt[sl] @ row.dense[self.name].to(xt.dtype).T
        if any_lora and len(self.scaling):
            delta += self._mixture(xt, weights.to(xt.dtype), ids)
        return y + delta.reshape(*shape[:-1], -1).to(y.dtype)
