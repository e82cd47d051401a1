"""Triton kernel for the per-token LoRA mixture (see lora_mixture.py for the maths).

One program per token: load x[t], and for each of its k experts shrink with A[e] and
expand with B[e], accumulating w · s · B A x. Runs on GPUs; on CPU it is checked against
the torch reference with TRITON_INTERPRET=1 (correctness only, not speed).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with the pinned torch
    triton = None


if triton is not None:
    @triton.jit
    def _lora_mixture_kernel(x_ptr, a_ptr, b_ptr, s_ptr, w_ptr, ids_ptr, out_ptr,
                             D_IN, D_OUT, R, K,
                             BLOCK_IN: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_R: tl.constexpr):
        t = tl.program_id(0)
        offs_in = tl.arange(0, BLOCK_IN)
        offs_out = tl.arange(0, BLOCK_OUT)
        offs_r = tl.arange(0, BLOCK_R)
        x = tl.load(x_ptr + t * D_IN + offs_in, mask=offs_in < D_IN, other=0.0)           # [BLOCK_IN]
        acc = tl.zeros([BLOCK_OUT], dtype=tl.float32)
        for j in range(0, K):
            e = tl.load(ids_ptr + t * K + j)
            w = tl.load(w_ptr + t * K + j) * tl.load(s_ptr + e)
            a = tl.load(a_ptr + e * R * D_IN + offs_r[:, None] * D_IN + offs_in[None, :],
                        mask=(offs_r[:, None] < R) & (offs_in[None, :] < D_IN), other=0.0)  # [BLOCK_R, BLOCK_IN]
            h = tl.sum(a * x[None, :], axis=1)                                              # [BLOCK_R]
            b = tl.load(b_ptr + e * D_OUT * R + offs_out[:, None] * R + offs_r[None, :],
                        mask=(offs_out[:, None] < D_OUT) & (offs_r[None, :] < R), other=0.0)  # [BLOCK_OUT, BLOCK_R]
            acc += w * tl.sum(b * h[None, :], axis=1)
        tl.store(out_ptr + t * D_OUT + offs_out, acc, mask=offs_out < D_OUT)


def lora_mixture_triton(x, a, b, scaling, weights, ids):
    if triton is None:
        raise RuntimeError("triton is not installed")
    T, d_in = x.shape
    E, r, _ = a.shape
    d_out = b.shape[1]
    out = torch.empty(T, d_out, dtype=torch.float32, device=x.device)
    _lora_mixture_kernel[(T,)](
        x.float().contiguous(), a.float().contiguous(), b.float().contiguous(), scaling.float().contiguous(),
        weights.float().contiguous(), ids.to(torch.int32).contiguous(), out, d_in, d_out, r, ids.shape[1],
        BLOCK_IN=triton.next_power_of_2(d_in), BLOCK_OUT=triton.next_power_of_2(d_out),
        BLOCK_R=max(2, triton.next_power_of_2(r)))
    return out
