"""moerge's CPU punica wrapper for vLLM: every LoRA-wrapped layer calls `add_lora_linear` here.

Tokens whose LoRA id is a moerge plan (see vllm_plans.py) run the fused plan step of
moerge.kernels.plan_mixture over the experts resident in the plugin, sliced to each expert's real
rank, with the packed slices of a module (q/k/v, gate/up) in one shrink and one expand. Tokens of
any other LoRA adapter run the grouped path over vLLM's own stacked weights: the active adapters'
A and B concatenated along the rank, two matmuls whatever their number.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from moerge.executors.vllm_moe import MOE
from moerge.executors.vllm_plans import STATE, BatchTables
from moerge.kernels.plan_mixture import gated_coefficients, token_stats


class MoergePunicaCPU(PunicaWrapperCPU):
    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        ids = list(mapping.index_mapping)
        batch = STATE.begin_batch(ids)
        MOE.begin_batch(ids)
        self._native = None
        self._any_lora = any(i > 0 and i not in MOE.plans for i in ids)
        if batch is not None:
            native = torch.tensor([i > 0 and i not in STATE.plans and i not in MOE.plans for i in ids],
                                  dtype=torch.bool)
            if bool(native.any()):
                self._native = native
        self._batch = batch

    # -- vLLM's own adapters: grouped over the concatenated rank -------------------------
    def _grouped(self, y2, x2, lora_a_stacked, lora_b_stacked, scale, output_slices, only=None) -> None:
        idx = self.token_lora_indices
        if only is not None:
            idx = torch.where(only, idx, torch.full_like(idx, -1))
        slots = torch.unique(idx)
        slots = slots[slots >= 0]
        if slots.numel() == 0:
            return
        coef = (idx.unsqueeze(1) == slots.unsqueeze(0)).to(x2.dtype)          # [T, S]
        offset = 0
        for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices):
            a_s = a[slots, 0].to(x2.dtype)                                     # [S, r, d_in]
            b_s = b[slots, 0].to(x2.dtype)                                     # [S, d_out, r]
            S, r, d_in = a_s.shape
            h = (x2 @ a_s.reshape(S * r, d_in).T) * coef.repeat_interleave(r, dim=1)
            out = h @ b_s.permute(0, 2, 1).reshape(S * r, size)
            y2[:, offset:offset + size] += (out * scale if scale != 1.0 else out).to(y2.dtype)
            offset += size

    # -- moerge plans: one fused step ----------------------------------------------------
    def _plans(self, y2, x2, info, batch: BatchTables) -> None:
        t = STATE.table(info, batch)
        R = t.rank
        if R == 0:
            return
        if not batch.any_token:
            c = batch.fixed_rank.get(t.owner_key)
            if c is None:     # the same for every layer of this module kind: once per forward
                c = batch.fixed_rank[t.owner_key] = batch.fixed.index_select(1, t.owner).to(t.w_out.dtype)
            h = torch.mm(x2, t.w_all_t[:, :R]) * c                                    # [T, R]
            y2.addmm_(h.to(y2.dtype), t.w_out.to(y2.dtype)) if y2.dtype != t.w_out.dtype else y2.addmm_(h, t.w_out)
            return
        H = torch.mm(x2, t.w_all_t)                                                    # [T, R + 2·S·E]
        T, S, E = H.shape[0], t.n_slices, t.n_experts
        g = H[:, R:].reshape(T, S, 2, E)
        mb = batch.module_bias(info.key)
        coef, w, ids = gated_coefficients(g[:, :, 0], g[:, :, 1], t.d_in, token_stats(x2), t.gsum, t.present,
                                          batch.phat, batch.bias if mb is None else batch.bias + mb, batch.k,
                                          batch.temperature, batch.kmax, batch.tokw)
        c = coef.reshape(T, S * E).index_select(1, t.slice_owner)                      # [T, R]
        fixed = batch.fixed_rank.get(t.owner_key)
        if fixed is None:
            fixed = batch.fixed_rank[t.owner_key] = batch.fixed.index_select(1, t.owner).to(t.w_out.dtype)
        c = torch.where(batch.token_rows.unsqueeze(1), c.to(fixed.dtype), fixed)
        h = H[:, :R] * c
        y2.addmm_(h.to(y2.dtype), t.w_out.to(y2.dtype)) if y2.dtype != t.w_out.dtype else y2.addmm_(h, t.w_out)
        self._record(info.layer, batch, w, ids)

    @staticmethod
    def _record(layer: int, batch: BatchTables, w: torch.Tensor, ids: torch.Tensor) -> None:
        """Routing mass per (plan, expert) for this layer, summed over slices, token-gated rows only."""
        P1, E = len(batch.plans) + 1, len(batch.experts)
        T = w.shape[0]
        w = w * batch.token_rows.view(T, 1, 1).to(w.dtype)
        flat = (batch.plan_of_token.view(T, 1, 1) * E + ids).reshape(-1)
        mass = torch.zeros(P1 * E).index_add_(0, flat, w.reshape(-1).float()).view(P1, E)
        batch.usage[layer] = batch.usage[layer] + mass if layer in batch.usage else mass

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                        lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
                        *, buffer=None, **kwargs: Any):
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        batch = getattr(self, "_batch", None)
        info = STATE.modules.get(id(lora_a_stacked))
        if batch is not None and info is not None:
            if x2.shape[0] != batch.n_tokens:
                raise RuntimeError(f"moerge plugin: {x2.shape[0]} tokens in a layer but {batch.n_tokens} in the "
                                   "LoRA mapping; this vLLM layout is not supported")
            self._plans(y2, x2, info, batch)
            if self._native is not None:
                self._grouped(y2, x2, lora_a_stacked, lora_b_stacked, scale, output_slices, only=self._native)
            return y
        if not getattr(self, "_any_lora", True):      # base-only batch: nothing to add
            return y
        if self.token_lora_indices.shape[0] != x2.shape[0]:
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                           buffer=buffer, **kwargs)
        self._grouped(y2, x2, lora_a_stacked, lora_b_stacked, scale, output_slices)
        return y

