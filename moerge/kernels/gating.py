"""Token-level gating: score each token against each expert's gate vector, add a per-row
bias, keep the top-k, softmax over the kept logits.

Shapes: x [T, d] tokens, gates [E, d] one vector per expert, row_bias [T, E] (already
expanded from per-request bias; -inf masks an expert out), result weights [T, k] and
ids [T, k]. Nothing is normalised across tokens or rows, so a token's routing depends on
that token and its own request only.
"""

from __future__ import annotations

import math

import torch


def standardise(v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero mean, unit std along the last dim (PHATGOOSE's inference-time normalisation)."""
    v = v - v.mean(dim=-1, keepdim=True)
    return v / (v.std(dim=-1, keepdim=True, unbiased=False) + eps)


def gate_logits_reference(x: torch.Tensor, gates: torch.Tensor, mode: str) -> torch.Tensor:
    """[T, E] logits, one token at a time (the plain definition)."""
    rows = []
    for t in range(x.shape[0]):
        xt = x[t].float()
        if mode == "arrow":
            rows.append(torch.stack([(xt @ g.float()).abs() for g in gates]))
        elif mode == "phatgoose":
            xs = standardise(xt)
            rows.append(torch.stack([xs @ standardise(g.float()) for g in gates]) / math.sqrt(x.shape[-1]))
        else:
            raise ValueError(f"unknown gating mode {mode!r}")
    return torch.stack(rows)


def gate_logits(x: torch.Tensor, gates: torch.Tensor, mode: str) -> torch.Tensor:
    """[T, E] logits, one matmul. For phatgoose pass gates already standardised (cheaper)."""
    x = x.float()
    if mode == "arrow":
        return (x @ gates.float().T).abs()
    if mode == "phatgoose":
        return (standardise(x) @ gates.float().T) / math.sqrt(x.shape[-1])
    raise ValueError(f"unknown gating mode {mode!r}")


def topk_softmax_reference(logits: torch.Tensor, k: int, bias: torch.Tensor | None = None,
                           temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: add bias, sort, keep k finite best, softmax over them. Weights [T, k], ids [T, k]."""
    T, E = logits.shape
    k = min(k, E)
    weights = torch.zeros(T, k)
    ids = torch.zeros(T, k, dtype=torch.long)
    for t in range(T):
        row = logits[t].float() + (bias[t].float() if bias is not None else 0)
        order = sorted(range(E), key=lambda e: (-row[e].item(), e))[:k]
        vals = torch.stack([row[e] for e in order]) / temperature
        weights[t] = torch.softmax(vals, dim=0)
        ids[t] = torch.tensor(order)
    return weights, ids


def topk_softmax(logits: torch.Tensor, k: int, bias: torch.Tensor | None = None,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised top-k + softmax. Ties break towards the lower expert id, like the reference."""
    row = logits.float() if bias is None else logits.float() + bias.float()
    k = min(k, row.shape[-1])
    # stable descending sort keeps the lower id first among equal logits
    vals, ids = torch.sort(row, dim=-1, descending=True, stable=True)
    vals, ids = vals[:, :k], ids[:, :k]
    return torch.softmax(vals / temperature, dim=-1), ids


def route_tokens(x: torch.Tensor, gates: torch.Tensor, mode: str, k: int, bias: torch.Tensor | None = None,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole gating step: (weights [T, k], ids [T, k], logits [T, E])."""
    logits = gate_logits(x, gates, mode)
    w, ids = topk_softmax(logits, k, bias, temperature)
    return w, ids, logits
