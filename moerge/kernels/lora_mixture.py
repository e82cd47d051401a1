"""Per-token mixtures of LoRA experts: delta[t] = Σ_j w[t, j] · s[e] · B[e] A[e] x[t], e = ids[t, j].

Shapes: x [T, d_in], A [E, r, d_in], B [E, d_out, r], scaling [E], weights/ids [T, k].

Three ways, same maths:
- `lora_mixture_reference`: token by token (the definition, for tests);
- `lora_mixture_grouped`: sort (token, slot) pairs by expert, one shrink and one expand
  matmul per expert segment, scatter-add back: cost grows with the experts actually used;
- `lora_mixture_dense`: all experts for all tokens as two matmuls over the concatenated
  [E·r] rank dimension, with the non-selected experts' coefficients zeroed: fastest while
  E·r is small (on CPU two big matmuls beat many small ones).
`lora_mixture` picks between the last two by E·r.
"""

from __future__ import annotations

import torch

DENSE_MAX_TOTAL_RANK = 256  # `python -m bench kernels`: dense still beats grouped at 64 experts x r4


def lora_mixture_reference(x, a, b, scaling, weights, ids):
    out = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            out[t] += float(weights[t, j]) * float(scaling[e]) * (b[e].float() @ (a[e].float() @ x[t].float()))
    return out


def lora_mixture_grouped(x, a, b, scaling, weights, ids):
    T, k = ids.shape
    flat_ids = ids.reshape(-1)                                  # [T*k]
    flat_w = weights.reshape(-1).to(x.dtype)                    # [T*k]
    token_of = torch.arange(T).repeat_interleave(k)             # [T*k]
    order = torch.argsort(flat_ids, stable=True)
    sorted_ids = flat_ids[order]
    experts, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    out = torch.zeros(T, b.shape[1], dtype=x.dtype)
    start = 0
    for e, n in zip(experts.tolist(), counts.tolist()):
        seg = order[start:start + n]
        start += n
        toks = token_of[seg]
        coef = (flat_w[seg] * scaling[e].to(x.dtype)).unsqueeze(1)       # [n, 1]
        h = x[toks] @ a[e].to(x.dtype).T                                 # shrink: [n, r]
        out.index_add_(0, toks, (h * coef) @ b[e].to(x.dtype).T)         # expand: [n, d_out]
    return out


def stack_for_dense(a: torch.Tensor, b: torch.Tensor, scaling: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A_cat [E·r, d_in] and (s·B)_cat^T [E·r, d_out], prepared once per module."""
    E, r, d_in = a.shape
    a_cat = a.reshape(E * r, d_in)
    b_cat = (b * scaling.view(E, 1, 1)).permute(0, 2, 1).reshape(E * r, b.shape[1])
    return a_cat.contiguous(), b_cat.contiguous()


def coefficients(weights: torch.Tensor, ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Dense per-token expert coefficients [T, E] (zero where not selected)."""
    coef = torch.zeros(ids.shape[0], n_experts, dtype=weights.dtype)
    return coef.scatter_add_(1, ids, weights)


def lora_mixture_dense(x, a_cat, b_cat, coef, rank: int):
    """x [T, d_in], a_cat [E·r, d_in], b_cat [E·r, d_out], coef [T, E] -> [T, d_out]."""
    h = x @ a_cat.T                                              # shrink, all experts: [T, E·r]
    h = h * coef.to(x.dtype).repeat_interleave(rank, dim=1)      # keep the selected experts only
    return h @ b_cat                                             # expand: [T, d_out]


def lora_mixture(x, a, b, scaling, weights, ids):
    E, r, _ = a.shape
    if E * r <= DENSE_MAX_TOTAL_RANK:
        a_cat, b_cat = stack_for_dense(a.to(x.dtype), b.to(x.dtype), scaling.to(x.dtype))
        return lora_mixture_dense(x, a_cat, b_cat, coefficients(weights, ids, E), r)
    return lora_mixture_grouped(x, a, b, scaling, weights, ids)
