"""Arrow prototypes: the top right singular vector of B·A, computed without forming B·A."""

from __future__ import annotations

import torch

from moerge.kernels.arrow import arrow_prototypes, top_right_singular_vector


def test_prototype_is_the_top_right_singular_vector_of_the_update_up_to_sign():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 16, generator=g), torch.randn(24, 4, generator=g)
    v = top_right_singular_vector(a, b)
    ref = torch.linalg.svd((b @ a).double()).Vh[0].float()
    assert abs(float(v @ ref)) > 1 - 1e-5 and abs(float(v.norm()) - 1) < 1e-5
    assert v[v.abs().argmax()] > 0


def test_prototypes_cover_every_module():
    w = {"q": (torch.randn(2, 8), torch.randn(8, 2)), "v": (torch.randn(2, 8), torch.randn(6, 2))}
    assert {m: p.shape for m, p in arrow_prototypes(w).items()} == {"q": (8,), "v": (8,)}
