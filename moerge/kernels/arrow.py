"""Arrow prototypes: per adapted module, the top right singular vector of B·A (data-free).

B A = Q_B (R_B A) with Q_B orthonormal, so the right singular vectors of B A are those of
the small [r, d_in] matrix R_B A: an SVD of r rows instead of d_out.
"""

from __future__ import annotations

import torch


def top_right_singular_vector(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: [r, d_in], b: [d_out, r] -> v: [d_in], unit norm, sign fixed (largest |entry| > 0)."""
    _, r_b = torch.linalg.qr(b.double())            # r_b: [r, r]
    _, _, vh = torch.linalg.svd(r_b @ a.double(), full_matrices=False)
    v = vh[0]
    if v[v.abs().argmax()] < 0:
        v = -v
    return v.float()


def arrow_prototypes(weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """module -> prototype [d_in] for every (A, B) pair."""
    return {m: top_right_singular_vector(a, b) for m, (a, b) in weights.items()}
