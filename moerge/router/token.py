"""Shared shape of the token-level methods: per module, stacked gate vectors [E, d_in] for the
eligible experts, a gating mode for moerge.kernels.gating, top-k, and a per-request bias."""

from __future__ import annotations

import time

import torch

from moerge.kernels.gating import standardise
from moerge.router.base import ExpertScore, Router, RoutingDecision


class TokenRouter(Router):
    granularity = "token"
    mode = ""          # gating mode: "arrow" | "phatgoose"
    role = ""          # artifact holding the per-module vectors: "arrow" | "gate"

    def __init__(self, top_k: int = 2, temperature: float = 1.0):
        self.top_k = top_k
        self.temperature = temperature
        self._stack_cache: dict[tuple, dict[str, torch.Tensor]] = {}

    def eligible(self) -> list[str]:
        return [c.name for c in self.ctx.pool.list() if c.kind == "lora" and self.role in c.artifacts]

    def module_gates(self, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module -> (positions in `names` of the experts that adapt it [E_m], their vectors [E_m, d_in]).

        Experts that do not adapt a module cannot be picked there (phatgoose vectors are
        standardised once here, arrow prototypes are unit norm).
        """
        key = tuple(names)
        if key not in self._stack_cache:
            tables = [self.ctx.gate_table(n, self.role) for n in names]
            modules = sorted(set().union(*(set(t) for t in tables))) if tables else []
            stacked = {}
            for m in modules:
                have = [i for i, t in enumerate(tables) if m in t]
                g = torch.stack([tables[i][m].float() for i in have])
                g = standardise(g) if self.mode == "phatgoose" else g / g.norm(dim=-1, keepdim=True)
                stacked[m] = (torch.tensor(have), g)
            self._stack_cache = {key: stacked}   # one expert set at a time is enough
        return self._stack_cache[key]

    def request_bias(self, query: str, names: list[str]) -> tuple[dict[str, float], dict]:
        return {}, {}

    def route(self, query, *, task=None):
        t0 = time.perf_counter()
        names = self.eligible()
        bias, detail = self.request_bias(query, names)
        abstain = bool(detail.pop("abstain", False))
        experts = sorted((ExpertScore(n, bias.get(n, 0.0)) for n in names), key=lambda e: -e.score)
        d = RoutingDecision(method=self.name, granularity="token", experts=experts,
                            chosen=[] if abstain else names, abstained=abstain or not names, bias=bias,
                            instruction=detail.pop("instruction", None),
                            detail={"top_k": self.top_k, "mode": self.mode, **detail})
        d.latency_ms = (time.perf_counter() - t0) * 1000
        return d
