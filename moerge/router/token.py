"""Shared shape of the token-level methods: which experts are eligible, which gate set and gating
mode (moerge.kernels.gating) the engine applies per token and module, top-k, temperature, and a
per-request bias. The engines load the gate vectors themselves, from the plan's files."""

from __future__ import annotations

import time

from moerge.router.base import ExpertScore, Router, RoutingDecision


class TokenRouter(Router):
    granularity = "token"
    mode = ""          # gating mode: "arrow" | "phatgoose"
    role = ""          # artifact holding the per-module vectors: "arrow" | "gate"

    def __init__(self, top_k: int = 2, temperature: float = 1.0):
        self.top_k = top_k
        self.temperature = temperature

    def eligible(self) -> list[str]:
        return [c.name for c in self.ctx.pool.list() if c.kind == "lora" and self.role in c.artifacts]

    def request_bias(self, query: str, names: list[str]) -> tuple[dict[str, float], dict]:
        return {}, {}

    def route(self, query, *, task=None):
        t0 = time.perf_counter()
        names = self.eligible()
        bias, detail = self.request_bias(query, names)
        abstain = bool(detail.pop("abstain", False))
        module_bias = detail.pop("module_bias", {})
        shown = detail.pop("scores", bias)          # what the explanation ranks the experts by
        experts = sorted((ExpertScore(n, shown.get(n, 0.0)) for n in names), key=lambda e: -e.score)
        d = RoutingDecision(method=self.name, granularity="token", experts=experts,
                            chosen=[] if abstain else names, abstained=abstain or not names, bias=bias,
                            instruction=detail.pop("instruction", None),
                            gating={"gate_set": self.role, "mode": self.mode, "top_k": self.top_k,
                                    "temperature": self.temperature},
                            detail={"top_k": self.top_k, "mode": self.mode, **detail}, module_bias=module_bias)
        d.latency_ms = (time.perf_counter() - t0) * 1000
        return d
