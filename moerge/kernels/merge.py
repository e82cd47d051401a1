"""Static merges of LoRA experts' dense updates (deltas: each [d_out, d_in], s_e B_e A_e).

- `merge-linear`: the mean of the experts' updates, Σ_e s_e B_e A_e / E;
- `merge-cat`: the experts' updates summed, as one LoRA of rank Σ r_e (concatenate A, B);
- `merge-ties`: TIES on the dense updates: trim each to its top `density` by magnitude,
  elect a sign per weight by total mass, average the values that agree with it.
"""

from __future__ import annotations

import torch


def merge_linear(deltas: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(deltas).mean(0)


def merge_cat(deltas: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(deltas).sum(0)


def merge_ties(deltas: list[torch.Tensor], density: float = 0.2, lam: float = 1.0) -> torch.Tensor:
    d = torch.stack(deltas)                                    # [E, d_out, d_in]
    flat = d.reshape(d.shape[0], -1)
    k = max(1, int(density * flat.shape[1]))
    thresh = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values
    trimmed = torch.where(flat.abs() >= thresh, flat, torch.zeros_like(flat))
    sign = torch.sign(trimmed.sum(0))                          # elected sign per weight
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    total = (trimmed * agree).sum(0)
    count = agree.sum(0).clamp(min=1)
    return (lam * total / count).reshape(d.shape[1:])


MERGES = {"merge-linear": merge_linear, "merge-cat": merge_cat, "merge-ties": merge_ties}
