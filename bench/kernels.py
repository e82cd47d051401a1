"""LoRA-mixture kernels at SmolLM2 shapes: grouped vs naive per-expert loop vs dense all-experts."""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table

from moerge.kernels.gating import topk_softmax
from moerge.kernels.lora_mixture import coefficients, lora_mixture_dense, lora_mixture_grouped, stack_for_dense


def naive_per_expert(x, a, b, s, w, ids):
    """One shrink/expand over *all* tokens per expert, masked by that expert's coefficients."""
    coef = coefficients(w, ids, a.shape[0])
    out = torch.zeros(x.shape[0], b.shape[1])
    for e in range(a.shape[0]):
        out += coef[:, e:e + 1] * s[e] * ((x @ a[e].T) @ b[e].T)
    return out


def _time(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def run(console: Console | None = None) -> dict:
    console = console or Console(width=150)
    torch.manual_seed(0)
    table = Table("tokens", "experts", "grouped ms", "naive ms", "dense ms", "naive÷grouped", "dense÷grouped",
                  title="LoRA mixture, d_in=576 -> d_out=1536, r=4, top-2 (lower ms is better)")
    rows = []
    for T, E in [(1, 12), (16, 12), (256, 12), (256, 64), (1024, 12)]:
        x = torch.randn(T, 576)
        a, b, s = torch.randn(E, 4, 576) / 24, torch.randn(E, 1536, 4), torch.rand(E)
        w, ids = topk_softmax(torch.randn(T, E), 2)
        a_cat, b_cat = stack_for_dense(a, b, s)
        coef = coefficients(w, ids, E)
        reps = 50 if T <= 16 else 10
        g = _time(lambda: lora_mixture_grouped(x, a, b, s, w, ids), reps)
        n = _time(lambda: naive_per_expert(x, a, b, s, w, ids), reps)
        d = _time(lambda: lora_mixture_dense(x, a_cat, b_cat, coef, 4), reps)
        rows.append({"tokens": T, "experts": E, "grouped_ms": g * 1e3, "naive_ms": n * 1e3, "dense_ms": d * 1e3})
        table.add_row(str(T), str(E), f"{g*1e3:.3f}", f"{n*1e3:.3f}", f"{d*1e3:.3f}", f"{n/g:.2f}", f"{d/g:.2f}")
    console.print(table)
    return {"rows": rows}
