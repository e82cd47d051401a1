"""The router interface: every method is a small class, registered by name, returning a RoutingDecision.

Sequence-level methods (`embed`, `glider-global`, `retrieval`, `oracle`, `base`) decide from
the request text. Token-level methods (`arrow`, `phatgoose`, `glider`) decide per token and
per module inside the model: their `route` returns the plan (which experts are eligible and
the per-request bias), and the per-layer usage histogram is filled in after generation.
Merges (`merge-*`) are static: one merged adapter for every request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass
class ExpertScore:
    name: str
    score: float


@dataclass
class RoutingDecision:
    method: str
    granularity: str                      # "none" | "sequence" | "token" | "static" | "moe"
    experts: list[ExpertScore] = field(default_factory=list)   # best first
    chosen: list[str] = field(default_factory=list)            # experts the executor uses
    abstained: bool = False
    latency_ms: float = 0.0
    # token-level: per-request bias on the gate logits (expert -> additive bias)
    bias: dict[str, float] = field(default_factory=dict)
    # token-level, filled after generation: {layer: {expert: share of routing mass}}
    layer_usage: dict[int, dict[str, float]] = field(default_factory=dict)
    instruction: str | None = None        # glider-global: the task instruction the LLM wrote
    # token-level: how to gate (gate_set "arrow" | "gate", mode "arrow" | "phatgoose", top_k, temperature)
    gating: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    # token-level, `joint`: per module ("3.attn") an additive bias per expert, the same for every token
    # of the request (not in to_json: the explanation carries the per-layer choices instead)
    module_bias: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"method": self.method, "granularity": self.granularity, "abstain": self.abstained,
               "experts": [{"name": e.name, "score": round(float(e.score), 6)} for e in self.experts],
               "chosen": list(self.chosen), "latency_ms": round(self.latency_ms, 3)}
        if self.instruction is not None:
            out["instruction"] = self.instruction
        if self.gating:
            out["gating"] = dict(self.gating)
        if self.bias:
            out["bias"] = {k: round(v, 4) for k, v in self.bias.items()}
        if self.layer_usage:
            out["layer_usage"] = {str(k): v for k, v in self.layer_usage.items()}
        if self.detail:
            out["detail"] = self.detail
        return out


class Router:
    """Base class: `fit` from the pool, `route` a request (its chat messages)."""

    name: ClassVar[str] = ""
    granularity: ClassVar[str] = "sequence"

    def fit(self, ctx: "RouterContext") -> "Router":
        self.ctx = ctx
        return self

    def route(self, query: str, *, task: str | None = None) -> RoutingDecision:
        raise NotImplementedError


def method_names() -> list[str]:
    from moerge.router.methods import METHODS   # the table imports every method, which import this module
    return sorted(METHODS)


def make_router(name: str, ctx: "RouterContext", **options) -> Router:
    from moerge.router.methods import METHODS
    if name not in METHODS:
        from moerge.experts.errors import ExpertError
        raise ExpertError(f"unknown routing method {name!r}: choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name](**options).fit(ctx)


def ranked(names: list[str], scores: np.ndarray) -> list[ExpertScore]:
    order = np.argsort(-scores, kind="stable")
    return [ExpertScore(names[i], float(scores[i])) for i in order]


def query_text(messages: list[dict] | str) -> str:
    """The text routing looks at: the last user turn (system prompts say nothing about the task)."""
    if isinstance(messages, str):
        return messages
    users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
    return users[-1] if users else (messages[-1].get("content") or "")


from moerge.router.context import RouterContext  # noqa: E402  (circular-safe: only for type names)
