"""Fast kernels equal their plain references on random inputs of many shapes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from moerge.kernels.gating import gate_logits, gate_logits_reference, standardise, topk_softmax, topk_softmax_reference
from moerge.kernels.lora_mixture import (
    lora_mixture, lora_mixture_dense, lora_mixture_grouped, lora_mixture_reference, stack_for_dense, coefficients,
)

SHAPES = [(1, 8, 8, 1, 1, 1), (5, 24, 40, 3, 4, 2), (17, 64, 32, 12, 8, 2), (33, 48, 96, 7, 2, 3), (4, 16, 16, 2, 16, 2)]


def _inputs(T, d_in, d_out, E, r, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g)
    a = torch.randn(E, r, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(E, d_out, r, generator=g)
    s = torch.rand(E, generator=g) + 0.5
    logits = torch.randn(T, E, generator=g)
    w, ids = topk_softmax(logits, k)
    return x, a, b, s, w, ids


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_lora_mixture_fast_paths_equal_reference(shape, seed):
    x, a, b, s, w, ids = _inputs(*shape, seed)
    ref = lora_mixture_reference(x, a, b, s, w, ids)
    assert torch.allclose(lora_mixture_grouped(x, a, b, s, w, ids), ref, atol=1e-4, rtol=1e-4)
    a_cat, b_cat = stack_for_dense(a, b, s)
    dense = lora_mixture_dense(x, a_cat, b_cat, coefficients(w, ids, a.shape[0]), a.shape[1])
    assert torch.allclose(dense, ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(lora_mixture(x, a, b, s, w, ids), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("T,d,E", [(1, 8, 1), (9, 32, 4), (40, 64, 12), (3, 576, 12)])
@pytest.mark.parametrize("mode", ["arrow", "phatgoose"])
def test_gating_fast_equals_reference(T, d, E, mode):
    g = torch.Generator().manual_seed(T * 7 + E)
    x, gates = torch.randn(T, d, generator=g), torch.randn(E, d, generator=g)
    fast_gates = standardise(gates) if mode == "phatgoose" else gates
    ref = gate_logits_reference(x, gates, mode)
    assert torch.allclose(gate_logits(x, fast_gates, mode), ref, atol=1e-4, rtol=1e-4)
    bias = torch.randn(T, E, generator=g) * 3
    bias[:, 0] = float("-inf") if E > 2 else 0.0
    for k in (1, 2, 4):
        w_ref, ids_ref = topk_softmax_reference(ref, k, bias, temperature=0.7)
        w, ids = topk_softmax(ref, k, bias, temperature=0.7)
        assert torch.equal(ids, ids_ref)
        assert torch.allclose(w, w_ref, atol=1e-6)
        assert torch.allclose(w.sum(-1), torch.ones(T))


def test_topk_ties_break_to_lower_expert_id():
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.5]])
    _, ids = topk_softmax(logits, 2)
    assert ids.tolist() == [[1, 2]]


def test_triton_kernel_matches_reference_in_interpreter():
    """TRITON_INTERPRET must be set before triton is imported: run in a fresh interpreter."""
    code = (
        "import torch\n"
        "from moerge.kernels.triton_lora import lora_mixture_triton\n"
        "from moerge.kernels.lora_mixture import lora_mixture_reference\n"
        "from tests.kernels.test_kernels import _inputs, SHAPES\n"
        "for i, sh in enumerate(SHAPES[:4]):\n"
        "    x, a, b, s, w, ids = _inputs(*sh, i)\n"
        "    d = (lora_mixture_triton(x, a, b, s, w, ids) - lora_mixture_reference(x, a, b, s, w, ids)).abs().max()\n"
        "    assert d < 1e-4, (sh, float(d))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
