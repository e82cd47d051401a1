"""RoutedLoraLinear: a linear layer that applies, per token, a weighted mixture of LoRA experts.

y = W x + Σ_{e ∈ top-k} w_e · s_e · B_e A_e x, where the weights come from the row's plan:
none (base), fixed experts with fixed weights (one adapter, or a linear/cat merge), a dense
delta (TIES), or token-level gating (moerge.kernels.gating) over the row's eligible experts
with the row's bias. Rows never see each other's plans: routing is per token, per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moerge.experts.joint_gates import module_key
from moerge.kernels.gating import route_tokens, topk_softmax
from moerge.kernels.lora_mixture import (
    DENSE_MAX_TOTAL_RANK, coefficients, lora_mixture_dense, lora_mixture_grouped, stack_for_dense,
)


@dataclass
class RowPlan:
    kind: str = "base"                       # "base" | "fixed" | "token" | "dense"
    ids: list[int] = field(default_factory=list)       # fixed: expert indices
    weights: list[float] = field(default_factory=list)  # fixed: their weights
    mode: str = ""                           # token: "arrow" | "phatgoose" | "pooled"
    eligible: list[int] = field(default_factory=list)   # token: expert indices allowed
    bias: list[float] = field(default_factory=list)     # token: per eligible expert
    module_bias: dict[str, list[float]] = field(default_factory=dict)  # token: module key -> per eligible expert
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
        self.counted: torch.Tensor | None = None        # [B, S] tokens that count in usage (not padding,
                                                        # not past a row's end); None = all
        self.record_usage = True


class RoutedLoraLinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, name: str, layer: int, state: BatchState):
        super().__init__()
        self.base = base
        self.name = name
        self.key = module_key(name)
        self.layer = layer
        self.state = state
        self.a = torch.zeros(0, 0, base.in_features)    # [E, r, d_in]
        self.b = torch.zeros(0, base.out_features, 0)   # [E, d_out, r]
        self.scaling = torch.zeros(0)                   # [E]
        self.present = torch.zeros(0, dtype=torch.bool)  # [E] the expert adapts this module
        self.dense, self.a_cat, self.b_cat = True, None, None
        self._merged, self._merged_src = None, None       # W + a dense update (TIES), while in use

    def set_experts(self, a: torch.Tensor, b: torch.Tensor, scaling: torch.Tensor) -> None:
        self.a, self.b, self.scaling = a, b, scaling
        self.present = a.flatten(1).ne(0).any(1) if len(a) else torch.zeros(0, dtype=torch.bool)
        # few experts × small rank: two matmuls over the concatenated rank beat per-expert segments
        self.dense = a.shape[0] * a.shape[1] <= DENSE_MAX_TOTAL_RANK
        self.a_cat, self.b_cat = stack_for_dense(a, b, scaling) if self.dense and len(a) else (None, None)

    def _mixture(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.dense:
            coef = coefficients(weights, ids, self.a.shape[0])
            return lora_mixture_dense(x, self.a_cat.to(x.dtype), self.b_cat.to(x.dtype), coef, self.a.shape[1])
        return lora_mixture_grouped(x, self.a, self.b, self.scaling, weights, ids)

    def _gate_rows(self, xt, rows, members, per_row, weights, ids) -> None:
        """Token gating for rows with the same gates: one logits matmul, per-row bias, top-k."""
        first = rows[members[0]]
        pos, gates = first.gates[self.name]
        tok = _token_index(members, per_row, len(rows))
        x = xt if tok is None else xt[tok]
        bias = None
        if any(rows[i].bias for i in members):
            per_row_bias = torch.stack([torch.tensor(rows[i].bias, dtype=torch.float32)[pos] if rows[i].bias
                                        else torch.zeros(len(pos)) for i in members])          # [R, E_m]
            bias = per_row_bias.repeat_interleave(per_row, dim=0)                               # [T_g, E_m]
        w, local, _ = route_tokens(x, gates, first.mode, first.top_k, bias, first.temperature)
        k = w.shape[1]
        global_ids = torch.tensor(first.eligible)[pos][local]                                   # [T_g, k]
        if tok is None:
            ids[:, :k] = global_ids
            weights[:, :k] = w
        else:
            ids[tok, :k] = global_ids
            weights[tok, :k] = w
        if self.state.record_usage:
            E, R = len(self.scaling), len(members)
            flat = (torch.arange(R).repeat_interleave(per_row * k) * E + global_ids.reshape(-1))
            wc = w
            if self.state.counted is not None:
                wc = w * self.state.counted[members].reshape(-1, 1).to(w.dtype)
            mass = torch.zeros(R * E).scatter_add_(0, flat, wc.reshape(-1)).view(R, E)
            for j, i in enumerate(members):
                rows[i].usage[self.layer] = rows[i].usage.get(self.layer, 0) + mass[j]

    def _pooled_row(self, i: int, row: RowPlan, sl: slice, per_row: int, weights, ids) -> bool:
        """A `pooled` row: this module's experts come from the row's module bias alone, the same for every
        token of the row (experts that do not adapt the module are left out, as in the vLLM engine)."""
        mb = row.module_bias.get(self.key)
        if mb is None or not row.eligible:
            return False
        logits = torch.tensor(mb, dtype=torch.float32)
        if row.bias:
            logits = logits + torch.tensor(row.bias, dtype=torch.float32)
        elig = torch.tensor(row.eligible)
        logits = logits.masked_fill(~self.present[elig], float("-inf"))
        if not bool(torch.isfinite(logits).any()):
            return False
        w, local = topk_softmax(logits.view(1, -1), row.top_k, None, row.temperature)
        w = torch.nan_to_num(w, nan=0.0)
        k = w.shape[1]
        gid = elig[local[0]]
        ids[sl, :k] = gid
        weights[sl, :k] = w[0]
        if self.state.record_usage:
            count = per_row if self.state.counted is None else float(self.state.counted[i].sum())
            mass = torch.zeros(len(self.scaling)).index_add_(0, gid, w[0] * count)
            row.usage[self.layer] = row.usage.get(self.layer, 0) + mass
        return True

    def _merged_forward(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Every row has the same dense update: one matmul with W + d (cached while d is in use)."""
        if self._merged_src is not d:
            self._merged = self.base.weight + d.to(self.base.weight.dtype)
            self._merged_src = d
        return torch.nn.functional.linear(x, self._merged, self.base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.state.rows
        if rows and rows[0].kind == "dense" and rows[0].dense is not None:
            d = rows[0].dense.get(self.name)
            if d is not None and all(r.kind == "dense" and r.dense is not None and r.dense.get(self.name) is d
                                     for r in rows):
                return self._merged_forward(x, d)
        y = self.base(x)
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
        token_groups: dict[tuple, list[int]] = {}
        dense_groups: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            sl = slice(i * per_row, (i + 1) * per_row)
            if row.kind == "fixed" and row.ids:
                n = len(row.ids)
                ids[sl, :n] = torch.tensor(row.ids)
                weights[sl, :n] = torch.tensor(row.weights)
                any_lora = True
            elif row.kind == "token" and row.mode == "pooled":
                any_lora = self._pooled_row(i, row, sl, per_row, weights, ids) or any_lora
            elif row.kind == "token" and row.gates is not None and self.name in row.gates:
                # rows that share gate vectors and settings are gated in one matmul (bias stays per row)
                key = (id(row.gates[self.name][1]), row.mode, row.top_k, row.temperature, tuple(row.eligible))
                token_groups.setdefault(key, []).append(i)
                any_lora = True
            elif row.kind == "dense" and row.dense is not None and self.name in row.dense:
                dense_groups.setdefault(id(row.dense[self.name]), []).append(i)
        for members in dense_groups.values():           # rows with the same dense update: one matmul
            d = rows[members[0]].dense[self.name].to(xt.dtype)
            tok = _token_index(members, per_row, len(rows))
            if tok is None:
                delta += xt @ d.T
            else:
                delta[tok] += xt[tok] @ d.T
        for members in token_groups.values():
            self._gate_rows(xt, rows, members, per_row, weights, ids)
        if any_lora and len(self.scaling):
            delta += self._mixture(xt, weights.to(xt.dtype), ids)
        return y + delta.reshape(*shape[:-1], -1).to(y.dtype)


def _token_index(members: list[int], per_row: int, n_rows: int) -> torch.Tensor | None:
    """Flattened token positions of the rows in `members`; None when that is every row."""
    if len(members) == n_rows:
        return None
    return torch.cat([torch.arange(i * per_row, (i + 1) * per_row) for i in members])
