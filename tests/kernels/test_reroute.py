"""Rerouting fast paths and Triton kernels equal the plain reference; the bare base is unchanged."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

from moerge.kernels.reroute import (
    identity_remap, reroute, reroute_reference, route_fused, route_reference,
)

CASES = [(T, M, k, A) for T, M, k, A in itertools.product([1, 7, 64], [2, 5, 13], [1, 2, 3], [0, 1, 4]) if k <= M]


def make_remap(M: int, A: int, seed: int) -> torch.Tensor:
    """remap [A+1, M]: row 0 identity; each slot replaces a random subset of experts (possibly none)
    with its own physical rows M, M+1, ...; slot 0 (row 1) replaces nothing in this layer."""
    g = torch.Generator().manual_seed(seed)
    remap = identity_remap(A + 1, M)
    nxt = M
    for s in range(1, A):  # row 1 stays an identity row: an adapter that replaces nothing here
        for e in torch.nonzero(torch.rand(M, generator=g) < 0.5).flatten().tolist():
            remap[s + 1, e] = nxt
            nxt += 1
    return remap


def make_inputs(T: int, M: int, k: int, A: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, M, generator=g) * 2
    rows = torch.randint(0, A + 1, (T,), generator=g)
    if T > 1:
        rows[0] = 0  # always mix bare-base tokens in
    return logits, rows, make_remap(M, A, seed)


@pytest.mark.parametrize("T,M,k,A", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_route_fused_equals_reference(T, M, k, A, seed):
    logits, rows, remap = make_inputs(T, M, k, A, seed)
    for renormalize in (True, False):
        w_ref, phys_ref = route_reference(logits, k, renormalize, rows, remap)
        w, phys = route_fused(logits, k, renormalize, rows, remap)
        assert phys.dtype == torch.int32 and w.dtype == torch.float32
        assert phys.is_contiguous() and w.is_contiguous()
        assert torch.equal(phys, phys_ref)
        assert torch.allclose(w, w_ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("T,M,k,A", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_reroute_equals_reference_including_repeated_ids(T, M, k, A, seed):
    g = torch.Generator().manual_seed(100 + seed)
    _, rows, remap = make_inputs(T, M, k, A, seed)
    ids = torch.randint(0, M, (T, k), generator=g)  # repeats allowed
    ids[:, -1] = ids[:, 0]
    for ids_typed, rows_typed in ((ids, rows), (ids.int(), rows.int())):
        phys = reroute(ids_typed, rows_typed, remap)
        assert phys.dtype == torch.int32 and phys.is_contiguous()
        assert torch.equal(phys, reroute_reference(ids, rows, remap))


def test_reroute_reads_the_adapter_row_not_the_base():
    remap = identity_remap(3, 4)
    remap[2, 1] = 7
    ids = torch.tensor([[1, 0], [1, 2], [1, 3]])
    rows = torch.tensor([0, 1, 2])
    expected = [[1, 0], [1, 2], [7, 3]]
    assert reroute_reference(ids, rows, remap).tolist() == expected
    assert reroute(ids, rows, remap).tolist() == expected
    assert route_fused(torch.tensor([[0.0, 5.0, 1.0, 0.0]] * 3), 1, True, rows, remap)[1].tolist() == [[1], [1], [7]]


def test_all_base_rows_equal_vllm_softmax_topk():
    from vllm.model_executor.layers.fused_moe.router.cpu_router import _softmax_topk
    for T, M, k, A in [(1, 2, 1, 0), (7, 5, 2, 4), (64, 13, 3, 1)]:
        logits, _, remap = make_inputs(T, M, k, A, seed=3)
        rows = torch.zeros(T, dtype=torch.long)
        for renormalize in (True, False):
            w_vllm, ids_vllm = _softmax_topk(logits, k, renormalize)
            for token_rows in (rows, None):
                w, phys = route_fused(logits, k, renormalize, token_rows, remap)
                assert torch.equal(phys, ids_vllm)
                assert torch.equal(w, w_vllm)


@pytest.mark.parametrize("ids,rows,match", [
    ([[0, 5]], [0], "topk_ids must lie in"),
    ([[-1, 0]], [0], "topk_ids must lie in"),
    ([[0, 1]], [3], "token_rows must lie in"),
    ([[0, 1]], [-1], "token_rows must lie in"),
    ([[0, 1]], [0, 0], "token_rows must be"),
    ([0, 1], [0], "topk_ids must be"),
])
def test_reference_rejects_bad_inputs(ids, rows, match):
    remap = identity_remap(3, 5)
    with pytest.raises(ValueError, match=match):
        reroute_reference(torch.tensor(ids), torch.tensor(rows), remap)


def test_route_reference_rejects_mismatched_expert_count():
    with pytest.raises(ValueError, match="gating_output must be"):
        route_reference(torch.zeros(2, 4), 1, True, torch.zeros(2, dtype=torch.long), identity_remap(1, 5))


def test_triton_kernels_match_reference_in_interpreter():
    """TRITON_INTERPRET must be set before triton is imported: run in a fresh interpreter.

    route_triton returns the k experts in descending logit order; compare per token as
    (phys, weight) pairs sorted by phys (a remap row never sends two experts to one row)."""
    code = (
        "import torch\n"
        "from moerge.kernels.reroute import reroute_triton, route_triton, reroute_reference, route_reference\n"
        "from tests.kernels.test_reroute import make_inputs\n"
        "for i, (T, M, k, A) in enumerate([(1, 2, 1, 0), (7, 5, 2, 4), (64, 13, 3, 4), (33, 5, 2, 1)]):\n"
        "    logits, rows, remap = make_inputs(T, M, k, A, i)\n"
        "    ids = torch.randint(0, M, (T, k))\n"
        "    assert torch.equal(reroute_triton(ids, rows, remap), reroute_reference(ids, rows, remap)), (T, M, k, A)\n"
        "    for renorm in (True, False):\n"
        "        w_ref, p_ref = route_reference(logits, k, renorm, rows, remap)\n"
        "        w, p = route_triton(logits, k, renorm, rows, remap)\n"
        "        p_ref, o_ref = p_ref.sort(dim=1); p, o = p.sort(dim=1)\n"
        "        assert torch.equal(p, p_ref), (T, M, k, A, renorm)\n"
        "        d = (w.gather(1, o) - w_ref.gather(1, o_ref)).abs().max()\n"
        "        assert d < 1e-6, (T, M, k, A, renorm, float(d))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
