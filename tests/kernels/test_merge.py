"""Static merges of dense LoRA updates."""

from __future__ import annotations

import torch

from moerge.kernels.merge import MERGES, merge_cat, merge_linear, merge_ties


def test_linear_is_the_mean_and_cat_the_sum_of_the_updates():
    deltas = [torch.randn(3, 5) for _ in range(4)]
    assert torch.allclose(merge_linear(deltas), sum(deltas) / 4)
    assert torch.allclose(merge_cat(deltas), sum(deltas))


def test_ties_keeps_the_elected_sign_and_averages_only_agreeing_values():
    a = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    b = torch.tensor([[4.0, 3.0, -0.5, 0.0]])
    got = merge_ties([a, b], density=1.0)
    # column 0: both agree (+) -> 3; column 1: elected + (mass 2) -> only b's 3; column 2: tie -> sign 0 -> 0
    assert torch.allclose(got, torch.tensor([[3.0, 3.0, 0.0, 0.0]]))


def test_ties_trims_each_update_to_its_top_density_by_magnitude():
    a = torch.tensor([[10.0, 1.0, 1.0, 1.0]])
    assert torch.allclose(merge_ties([a], density=0.25), torch.tensor([[10.0, 0.0, 0.0, 0.0]]))


def test_every_merge_method_has_its_maths():
    assert set(MERGES) == {"merge-linear", "merge-cat", "merge-ties"}
