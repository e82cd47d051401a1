"""One fused LoRA step for a batch of mixed plans: shrink, per-token coefficients, expand.

Every token has coefficients over the batch's experts E: fixed ones (an adapter is one-hot, a
static merge holds its weights, the base model is all zero) or gated ones (token-level plans).
Gated coefficients come from the gate columns of the same shrink matmul, for the S slices a
packed module computes (q/k/v, gate/up) at once:

    H = x · [A_1; …; A_E; G_arrow; G_phat]ᵀ                     [T, R + 2·S·E]
    logit = |H_arrow|                                 (arrow)
          = (H_phat − μ(x)·Σg) / ((σ(x)+ε)·√d)       (phatgoose: standardised x · standardised g / √d)
    logit += bias (each token's plan; −inf where its plan does not allow an expert)
    top-k (k per token), softmax(logit / temperature), scattered to [T, S, E]
    y += (H_rank ⊙ coef[:, owner]) · (s·B)ᵀ

Nothing is normalised across tokens, so a token's result depends on that token and its own plan.
Shapes: x [T, d], gate logits [T, S, E], coefficients [T, S, E].
"""

from __future__ import annotations

import math

import torch


def token_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, σ) per token, [T, 1, 1] float32 (σ without Bessel's correction, as PHATGOOSE standardises).
    Written out because torch.std is several times slower than this on CPU for [T, d] inputs."""
    xf = x.float()
    mu = xf.mean(-1, keepdim=True)
    sd = (xf - mu).square().mean(-1, keepdim=True).sqrt()
    return mu.unsqueeze(1), sd.unsqueeze(1)


def gated_coefficients(h_arrow: torch.Tensor, h_phat: torch.Tensor, d: int, stats: tuple[torch.Tensor, torch.Tensor],
                       gsum: torch.Tensor, present: torch.Tensor, phat: torch.Tensor, bias: torch.Tensor,
                       k: torch.Tensor, temperature: torch.Tensor, kmax: int, tokw: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(coef [T, S, E], weights [T, S, kk], ids [T, S, kk]) for token-gated rows.

    h_arrow/h_phat [T, S, E]: x·g for each gate set; d: x's width; stats: token_stats(x);
    gsum [S, E]: Σ of each standardised phatgoose gate (≈ 0; kept so the result is exact);
    present [S, E]: the expert adapts the slice; phat [T]: phatgoose mode (else arrow);
    bias [T, E]: each token's plan (−inf = not allowed), this module's bias included; k [T];
    temperature [T, 1]; tokw [T]: weight of the per-token logits (0 for `pooled` plans; None = 1).
    """
    mu, sd = stats
    lp = (h_phat.float() - mu * gsum) / ((sd + 1e-6) * math.sqrt(d))
    logits = torch.where(phat.view(-1, 1, 1), lp, h_arrow.float().abs())
    if tokw is not None:
        logits = logits * tokw.view(-1, 1, 1)
    logits = logits + bias.unsqueeze(1)
    logits = logits.masked_fill(~present, float("-inf"))
    kk = min(kmax, logits.shape[-1])
    vals, ids = torch.sort(logits, dim=-1, descending=True, stable=True)
    vals, ids = vals[..., :kk], ids[..., :kk]
    if kk > 1:
        vals = vals.masked_fill(torch.arange(kk) >= k.view(-1, 1, 1), float("-inf"))
    w = torch.softmax(vals / temperature.unsqueeze(1), dim=-1)
    w = torch.nan_to_num(w, nan=0.0)           # a token whose plan allows no expert here: no update
    coef = torch.zeros_like(logits).scatter_add_(-1, ids, w)
    return coef, w, ids
