"""What the service holds while it runs: settings, the pool, routers, executors, and the plan for a request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from moerge.config import Settings
from moerge.experts.errors import ExpertError, UnknownExpertError
from moerge.experts.pool import ExpertPool
from moerge.models.generation import Generation, SamplingParams
from moerge.router.base import ExpertScore, RoutingDecision, make_router, method_names, query_text


@dataclass
class Plan:
    """How one request is answered, and why (returned with every answer)."""

    decision: RoutingDecision
    router: object = None
    target: str = "lora"            # "lora" (the executor) | "model" (a whole-model expert)
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.decision.method

    def info(self) -> dict:
        out = self.decision.to_json()
        out["routing_ms"] = out.pop("latency_ms")
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def headers(self) -> dict:
        chosen = self.decision.chosen if not self.decision.abstained else []
        return {"x-moerge-method": self.decision.method, "x-moerge-experts": ",".join(chosen)}


class Runtime:
    def __init__(self, settings: Settings, pool: ExpertPool, executor, router_ctx=None, remote=None):
        self.settings = settings
        self.pool = pool
        self.executor = executor
        self.router_ctx = router_ctx
        self.remote = remote
        self._routers: dict[str, object] = {}

    def readiness(self) -> tuple[bool, dict]:
        ready = getattr(self.executor, "ready", lambda: True)()
        return ready, {"executor": self.executor.name, "experts": len(self.pool.names())}

    def model_ids(self) -> list[str]:
        return ["auto", "base", *[f"moerge:{m}" for m in method_names() if m != "oracle"], *self.pool.names()]

    def router(self, method: str):
        if method not in self._routers:
            if self.router_ctx is None:
                raise ExpertError("routing is not available in this server (no router context)")
            self._routers[method] = make_router(method, self.router_ctx)
        return self._routers[method]

    def plan(self, model: str, messages: list[dict]) -> Plan:
        t0 = time.perf_counter()
        query = query_text(messages)
        if model == "base":
            d = RoutingDecision("base", "none", abstained=True)
            plan = Plan(d)
        elif model == "auto" or model.startswith("moerge:"):
            method = self.settings.routing_method if model == "auto" else model.split(":", 1)[1]
            if method == "oracle":
                raise ExpertError("the oracle router needs task labels; it exists for evaluation only")
            router = self.router(method)
            plan = Plan(router.route(query), router)
        else:
            card = self.pool.registry.get(model)
            if card is None:
                raise UnknownExpertError(f"model {model!r} is not served here: use 'auto', 'base', "
                                         "'moerge:<method>' or an expert name from GET /v1/models")
            d = RoutingDecision("pinned", "sequence", experts=[ExpertScore(card.name, 1.0)], chosen=[card.name])
            plan = Plan(d, target="model" if card.kind == "model" else "lora")
        if plan.decision.chosen and plan.target == "lora" and plan.decision.granularity == "sequence":
            kinds = {c.name: c.kind for c in self.pool.list()}
            if kinds.get(plan.decision.chosen[0]) == "model":
                plan.target = "model"
        plan.decision.latency_ms = (time.perf_counter() - t0) * 1000
        return plan

    def generate(self, messages: list[dict], params: SamplingParams, plan: Plan) -> Generation:
        if plan.target == "model":
            return self.remote.generate(messages, params, plan, fallback=self.executor)
        return self.executor.generate(messages, params, plan)

    def stream(self, messages: list[dict], params: SamplingParams, plan: Plan):
        if plan.target == "model":
            return self.remote.stream(messages, params, plan, fallback=self.executor)
        return self.executor.stream(messages, params, plan)
