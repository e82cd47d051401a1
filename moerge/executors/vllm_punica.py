"""A faster CPU punica wrapper for vLLM's multi-LoRA batches, installed by the moerge vLLM plugin.

vLLM's CPU ops gather a private copy of the adapter weights for every token and einsum
over them. Here the adapters active in the batch are concatenated along the rank
dimension, so each LoRA linear costs two matmuls whatever the number of adapters:
h = x · A_catᵀ [T, S·r], masked so each token keeps only its own adapter's block, then
y += h · B_cat. Tokens without an adapter (slot -1) are masked out explicitly.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU


class GroupedPunicaCPU(PunicaWrapperCPU):
    def _slots(self, n_tokens: int):
        idx = self.token_lora_indices
        if idx.shape[0] != n_tokens:
            return None, None
        slots = torch.unique(idx)
        slots = slots[slots >= 0]
        if slots.numel() == 0:
            return idx, slots
        return idx, slots

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                        lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
                        *, buffer=None, **kwargs: Any) -> None:
        x2 = x.reshape(-1, x.shape[-1])
        idx, slots = self._slots(x2.shape[0])
        if idx is None:  # an unexpected layout: use vLLM's own path
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                           buffer=buffer, **kwargs)
        if slots.numel() == 0:
            return None
        y2 = y.view(-1, y.shape[-1])
        coef = (idx.unsqueeze(1) == slots.unsqueeze(0)).to(x2.dtype)          # [T, S]
        offset = 0
        for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices):
            a_s = a[slots, 0].to(x2.dtype)                                     # [S, r, d_in]
            b_s = b[slots, 0].to(x2.dtype)                                     # [S, d_out, r]
            S, r, d_in = a_s.shape
            h = x2 @ a_s.reshape(S * r, d_in).T                                # [T, S*r]
            h = h * coef.repeat_interleave(r, dim=1)
            out = h @ b_s.permute(0, 2, 1).reshape(S * r, size)                # [T, d_out]
            if scale != 1.0:
                out = out * scale
            y2[:, offset:offset + size] += out.to(y2.dtype)
            offset += size
        return None
