"""One fused LoRA step for a batch of mixed plans: shrink, per-token coefficients, expand.

Every token has coefficients over the batch's experts E: fixed ones (an adapter is one-hot, a
static merge holds its weights, the base model is all zero) or gated ones (token-level plans).
Gated coefficients come from the gate columns of the same shrink matmul:

    H = x · [A_1; …; A_E; G_arrow; G_phat]ᵀ              [T, R + 2E]
    logit = |H_arrow|            (arrow)
          = (H_phat − μ(x)·Σg) / ((σ(x)+ε)·√d)   (phatgoose: standardised x · standardised g / √d)
    logit += bias (per token's plan; −inf where its plan does not allow an expert)
    top-k (k per token), softmax(logit / temperature), scattered to [T, E]
    y += (H_rank ⊙ coef[:, owner]) · (s·B)ᵀ

Nothing is normalised across tokens, so a token's result depends on that token and its own plan.
Shapes: x [T, d], gate logits [T, E], coefficients [T, E].
"""

from __future__ import annotations

import math

import torch


def gated_coefficients(h_arrow: torch.Tensor, h_phat: torch.Tensor, x: torch.Tensor, gsum: torch.Tensor,
                       present: torch.Tensor, phat: torch.Tensor, bias: torch.Tensor, k: torch.Tensor,
                       temperature: torch.Tensor, kmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(coef [T, E], weights [T, kmax], ids [T, kmax]) for token-gated rows.

    h_arrow/h_phat [T, E] are x·g for each gate set; present [E] masks experts that do not adapt
    this module; bias [T, E] carries each token's plan (−inf = not allowed); k [T], temperature [T, 1].
    """
    xf = x.float()
    d = xf.shape[-1]
    mu = xf.mean(-1, keepdim=True)
    sd = xf.std(-1, unbiased=False, keepdim=True)
    lp = (h_phat.float() - mu * gsum) / ((sd + 1e-6) * math.sqrt(d))
    logits = torch.where(phat.unsqueeze(1), lp, h_arrow.float().abs()) + bias
    logits = logits.masked_fill(~present, float("-inf"))
    kk = min(kmax, logits.shape[1])
    vals, ids = torch.sort(logits, dim=-1, descending=True, stable=True)
    vals, ids = vals[:, :kk], ids[:, :kk]
    if kk > 1:
        vals = vals.masked_fill(torch.arange(kk) >= k.unsqueeze(1), float("-inf"))
    w = torch.softmax(vals / temperature, dim=-1)
    w = torch.nan_to_num(w, nan=0.0)           # a token whose plan allows no expert here: no update
    coef = torch.zeros_like(logits).scatter_add_(1, ids, w)
    return coef, w, ids
