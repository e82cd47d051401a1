"""Rerouting for ESFT adapters over a shared MoE base: map each token's logical top-k experts
to physical rows of the layer's extended expert table, through its adapter's remap row.

Shapes: router logits `gating_output: [T, M]`, `topk_ids: [T, k]`, `token_rows: [T]` with
0 = bare base and s+1 = adapter slot s, `remap: int32 [A+1, M]` (row 0 is the identity; a slot
that does not replace expert e in this layer maps e -> e). Result `phys: int32 [T, k]` indexes
the P = M + C rows of the fused MoE weights.

Three implementations, one semantics:
- `reroute_reference` / `route_reference`: plain torch, validated, obviously correct.
- `reroute` / `route_fused`: the CPU serving path. Softmax-top-k exactly as vLLM's CPU router
  (`_softmax_topk`), then the remap as one gather `remap[token_rows[:, None], ids]`; no pass
  over hidden states, no per-expert or per-adapter loop, no validation (called per layer per
  step). `token_rows=None` means "every token is on the bare base" and skips the gather; it
  saves the gather (~5-20 µs at 48-1536 tokens, bench/reroute.py), under 0.1% of the MoE layer,
  so callers may as well pass the rows always.
- `reroute_triton` / `route_triton`: Triton kernels (GPU; on CPU only under
  TRITON_INTERPRET=1, for correctness tests). `route_triton` fuses softmax, top-k by iterated
  max (k is small) and the remap in one program per token.

Ties: the torch paths return the ids `torch.topk(..., sorted=False)` returns, so ties and the
order of the k slots follow torch.topk (on CPU). `route_triton` returns the k experts in
descending order of logit, ties to the lower expert id; the MoE kernel sums over the k slots,
so the slot order does not change the layer output.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with the pinned torch
    triton = None


def identity_remap(n_rows: int, n_experts: int) -> torch.Tensor:
    """remap: int32 [n_rows, n_experts], every row arange(n_experts): nobody reroutes anything."""
    return torch.arange(n_experts, dtype=torch.int32).repeat(n_rows, 1)


# --- reference -------------------------------------------------------------------------------

def _validate(topk_ids: torch.Tensor, token_rows: torch.Tensor, remap: torch.Tensor) -> None:
    if remap.dim() != 2:
        raise ValueError(f"remap must be [A+1, M], got shape {tuple(remap.shape)}")
    if remap.dtype.is_floating_point or topk_ids.dtype.is_floating_point or token_rows.dtype.is_floating_point:
        raise ValueError("remap, topk_ids and token_rows must be integer tensors")
    n_rows, n_experts = remap.shape
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, k], got shape {tuple(topk_ids.shape)}")
    if token_rows.dim() != 1 or token_rows.shape[0] != topk_ids.shape[0]:
        raise ValueError(f"token_rows must be [T] with T={topk_ids.shape[0]} (one adapter row per token), "
                         f"got shape {tuple(token_rows.shape)}")
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= n_experts):
        raise ValueError(f"topk_ids must lie in [0, {n_experts}) (the layer's logical experts), "
                         f"got range [{int(topk_ids.min())}, {int(topk_ids.max())}]")
    if token_rows.numel() and (int(token_rows.min()) < 0 or int(token_rows.max()) >= n_rows):
        raise ValueError(f"token_rows must lie in [0, {n_rows - 1}] (0 = base, s+1 = adapter slot s), "
                         f"got range [{int(token_rows.min())}, {int(token_rows.max())}]")
    if remap.numel() and int(remap.min()) < 0:
        raise ValueError("remap holds physical expert rows, which must be >= 0")


def reroute_reference(topk_ids: torch.Tensor, token_rows: torch.Tensor, remap: torch.Tensor) -> torch.Tensor:
    """phys[t, j] = remap[token_rows[t], topk_ids[t, j]], element by element."""
    _validate(topk_ids, token_rows, remap)
    T, k = topk_ids.shape
    phys = torch.empty(T, k, dtype=torch.int32)
    for t in range(T):
        row = int(token_rows[t])
        for j in range(k):
            phys[t, j] = int(remap[row, int(topk_ids[t, j])])
    return phys


def route_reference(gating_output: torch.Tensor, top_k: int, renormalize: bool,
                    token_rows: torch.Tensor, remap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all M logits in float32, top-k, optional renormalisation, then reroute.

    Renormalising divides the k probabilities by their sum, which equals vLLM's softmax of the
    top-k logits.
    """
    if gating_output.dim() != 2 or gating_output.shape[1] != remap.shape[-1]:
        raise ValueError(f"gating_output must be [T, M] with M={remap.shape[-1]}, got {tuple(gating_output.shape)}")
    if not 1 <= top_k <= gating_output.shape[1]:
        raise ValueError(f"top_k must be in [1, {gating_output.shape[1]}], got {top_k}")
    logits = gating_output.float()                                        # [T, M]
    probs = torch.softmax(logits, dim=-1)                                 # [T, M]
    _, ids = torch.topk(logits, top_k, dim=-1, sorted=False)              # [T, k]
    weights = probs.gather(1, ids)                                        # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.contiguous(), reroute_reference(ids, token_rows, remap)


# --- CPU fast path ---------------------------------------------------------------------------

def reroute(topk_ids: torch.Tensor, token_rows: torch.Tensor | None, remap: torch.Tensor) -> torch.Tensor:
    """phys: int32 [T, k] as one gather; token_rows=None (all base) returns the ids as int32."""
    if token_rows is None:
        return topk_ids.to(torch.int32).contiguous()
    # advanced indexing measured faster than torch.take on a flat index (no index arithmetic)
    return remap[token_rows[:, None], topk_ids]


def route_fused(gating_output: torch.Tensor, top_k: int, renormalize: bool,
                token_rows: torch.Tensor | None, remap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's CPU `_softmax_topk` followed by the remap gather: (weights f32 [T, k], phys i32 [T, k]).

    Both outputs are contiguous: cpu_fused_moe reads them as raw float32 / int32 buffers.
    """
    vals, ids = torch.topk(gating_output, k=top_k, dim=-1, sorted=False)    # [T, k]
    if renormalize:
        weights = torch.softmax(vals, dim=-1)
    else:
        weights = (vals - torch.logsumexp(gating_output, dim=-1, keepdim=True)).exp()
    weights = weights.to(torch.float32).contiguous()
    if token_rows is None:
        return weights, ids.to(torch.int32)
    return weights, remap[token_rows[:, None], ids]


# --- Triton ----------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _reroute_kernel(ids_ptr, rows_ptr, remap_ptr, out_ptr, T, M, K,
                        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_k = tl.arange(0, BLOCK_K)
        mask = (offs_t[:, None] < T) & (offs_k[None, :] < K)                               # [BLOCK_T, BLOCK_K]
        ids = tl.load(ids_ptr + offs_t[:, None] * K + offs_k[None, :], mask=mask, other=0)
        rows = tl.load(rows_ptr + offs_t, mask=offs_t < T, other=0)                       # [BLOCK_T]
        phys = tl.load(remap_ptr + rows[:, None] * M + ids, mask=mask, other=0)
        tl.store(out_ptr + offs_t[:, None] * K + offs_k[None, :], phys, mask=mask)

    @triton.jit
    def _route_kernel(logits_ptr, rows_ptr, remap_ptr, w_ptr, phys_ptr, M, K,
                      RENORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        t = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        x = tl.load(logits_ptr + t * M + offs_m, mask=offs_m < M, other=float("-inf")).to(tl.float32)
        top = tl.max(x, axis=0)
        z = tl.sum(tl.where(offs_m < M, tl.exp(x - top), 0.0), axis=0)     # softmax denominator over M
        vals = tl.full([BLOCK_K], float("-inf"), tl.float32)
        ids = tl.zeros([BLOCK_K], dtype=tl.int32)
        rest = x
        for j in range(0, K):                                               # iterated max, k is small
            v = tl.max(rest, axis=0)
            e = tl.min(tl.where((rest == v) & (offs_m < M), offs_m, BLOCK_M), axis=0)
            vals = tl.where(offs_k == j, v, vals)
            ids = tl.where(offs_k == j, e, ids)
            rest = tl.where(offs_m == e, float("-inf"), rest)
        p = tl.where(offs_k < K, tl.exp(vals - top), 0.0)                  # [BLOCK_K]
        if RENORMALIZE:
            w = p / tl.sum(p, axis=0)
        else:
            w = p / z
        row = tl.load(rows_ptr + t)
        phys = tl.load(remap_ptr + row * M + ids, mask=offs_k < K, other=0)
        tl.store(w_ptr + t * K + offs_k, w, mask=offs_k < K)
        tl.store(phys_ptr + t * K + offs_k, phys, mask=offs_k < K)


def reroute_triton(topk_ids: torch.Tensor, token_rows: torch.Tensor, remap: torch.Tensor,
                   block_t: int = 16) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("triton is not installed")
    T, k = topk_ids.shape
    out = torch.empty(T, k, dtype=torch.int32, device=topk_ids.device)
    _reroute_kernel[(triton.cdiv(T, block_t),)](
        topk_ids.to(torch.int32).contiguous(), token_rows.to(torch.int32).contiguous(),
        remap.to(torch.int32).contiguous(), out, T, remap.shape[1], k,
        BLOCK_T=block_t, BLOCK_K=max(2, triton.next_power_of_2(k)))
    return out


def route_triton(gating_output: torch.Tensor, top_k: int, renormalize: bool,
                 token_rows: torch.Tensor, remap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if triton is None:
        raise RuntimeError("triton is not installed")
    T, M = gating_output.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=gating_output.device)
    phys = torch.empty(T, top_k, dtype=torch.int32, device=gating_output.device)
    _route_kernel[(T,)](
        gating_output.contiguous(), token_rows.to(torch.int32).contiguous(), remap.to(torch.int32).contiguous(),
        weights, phys, M, top_k, RENORMALIZE=bool(renormalize),
        BLOCK_M=max(2, triton.next_power_of_2(M)), BLOCK_K=max(2, triton.next_power_of_2(top_k)))
    return weights, phys
