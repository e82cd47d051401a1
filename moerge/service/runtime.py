"""What the service holds while it runs (a started `System`), and how one request is routed and run."""

from __future__ import annotations

import time
from contextlib import aclosing
from dataclasses import dataclass, field

from moerge.experts.errors import ExpertError, UnknownExpertError
from moerge.models.generation import Generation, SamplingParams, StreamDelta
from moerge.plan import ExecutionPlan
from moerge.router.base import ExpertScore, RoutingDecision, make_router, method_names, query_text
from moerge.router.chain import is_chain
from moerge.router.verify import judge, pending
from moerge.service import chain as chain_run
from moerge.startup import System


@dataclass
class RequestPlan:
    """How one request is answered, and why: the routing decision, the execution plan that ran, and
    for token-level plans the per-layer expert usage measured while generating."""

    decision: RoutingDecision
    execution: ExecutionPlan
    layer_usage: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.decision.method

    def info(self) -> dict:
        out = self.decision.to_json()
        out["routing_ms"] = out.pop("latency_ms")
        out.update(self.execution.info())
        if self.layer_usage:
            out["layer_usage"] = {str(k): v for k, v in self.layer_usage.items()}
        return out

    def headers(self) -> dict:
        chosen = self.decision.chosen if not self.decision.abstained else []
        if self.execution.kind == "base":
            chosen = []
        return {"x-moerge-method": self.decision.method, "x-moerge-experts": ",".join(chosen),
                "x-moerge-engine": self.execution.engine}


class Runtime:
    def __init__(self, system: System):
        self.system = system
        self.settings = system.settings
        self.pool = system.pool
        self.router_ctx = system.router_ctx
        self._routers: dict[str, object] = {}
        self.rerouted = 0          # routed again because the decision named a just-removed expert

    @property
    def executor(self):
        """The preferred engine (the console's Health page describes it)."""
        return self.system.local[0]

    def readiness(self) -> tuple[bool, dict]:
        ready = self.executor.ready()
        detail = {"executor": self.executor.name, "experts": len(self.pool.names())}
        if getattr(self.executor, "error", None):       # e.g. the vLLM engine died and is restarting
            detail["error"] = self.executor.error
        return ready, detail

    def model_ids(self) -> list[str]:
        return ["auto", "base", *[f"moerge:{m}" for m in method_names() if m != "oracle"], *self.pool.names()]

    def router(self, method: str):
        if method not in self._routers:
            if self.router_ctx is None:
                raise ExpertError("routing is not available in this server (no router context)")
            self._routers[method] = make_router(method, self.router_ctx)
        return self._routers[method]

    def decide(self, model: str, messages: list[dict]) -> RoutingDecision:
        t0 = time.perf_counter()
        if model == "base":
            d = RoutingDecision("base", "none", abstained=True)
        elif model == "auto" or model.startswith("moerge:"):
            method = self.settings.routing_method if model == "auto" else model.split(":", 1)[1]
            if method == "oracle":
                raise ExpertError("the oracle router needs task labels; it exists for evaluation only")
            d = self.router(method).route(query_text(messages))
        else:
            card = self.pool.registry.get(model)
            if card is None:
                raise UnknownExpertError(f"model {model!r} is not served here: use 'auto', 'base', "
                                         "'moerge:<method>' or an expert name from GET /v1/models")
            d = RoutingDecision("pinned", "sequence", experts=[ExpertScore(card.name, 1.0)], chosen=[card.name])
        d.latency_ms = (time.perf_counter() - t0) * 1000
        return d

    def plan(self, model: str, messages: list[dict]) -> RequestPlan:
        """The routing decision and its execution plan. A routed request whose decision named an
        expert that was removed before the plan was made (a registration race) is routed again,
        up to twice, after reading other replicas' changes (so routers here drop an expert another
        replica removed); the client did not ask for that expert, so it must not see its 404. A pinned
        request for a removed expert keeps the 404."""
        routed = model == "auto" or model.startswith("moerge:")
        for attempt in range(3):
            d = self.decide(model, messages)
            try:
                # a chain's plan is its last step's; the steps before it run first (service/chain.py)
                return RequestPlan(d, chain_run.last_step_plan(self.system, d) if is_chain(d) else self.system.plan(d))
            except UnknownExpertError:
                if not routed or attempt == 2:
                    raise
                self.rerouted += 1
                # removed by another replica? then this one's routers learn it now, not at the next poll
                self.system.pool.changes.poll_or_log()
        raise AssertionError("unreachable")

    def generate(self, messages: list[dict], params: SamplingParams, rp: RequestPlan) -> Generation:
        if is_chain(rp.decision):
            messages = chain_run.run_before_last(self.system, self.router(rp.method), messages, params, rp.decision)
            rp.execution = chain_run.last_step_plan(self.system, rp.decision)
        gen, rp.execution = self.system.generate(messages, params, rp.execution)
        if pending(rp.decision) and judge(rp.decision, query_text(messages), gen.text):
            first = gen      # the expert handed the request back: the base model answers (router/verify.py);
            # usage counts the reply's tokens, the routing record the expert's
            gen, rp.execution = self.system.generate(messages, params, self.system.plan(rp.decision))
            rp.decision.detail["verify"]["expert_completion_tokens"] = first.completion_tokens
        rp.layer_usage = gen.layer_usage
        if is_chain(rp.decision):
            chain_run.record_last(rp.decision, gen.text, rp.execution)
        return gen

    def stream(self, messages: list[dict], params: SamplingParams, rp: RequestPlan):
        if is_chain(rp.decision):      # the steps before the last run first; the last one streams
            messages = chain_run.run_before_last(self.system, self.router(rp.method), messages, params, rp.decision)
            rp.execution = chain_run.last_step_plan(self.system, rp.decision)
        if pending(rp.decision):       # the answer is checked before any of it is sent: one delta, then the end
            yield from _as_deltas(self.generate(messages, params, rp))
            return
        it, rp.execution = self.system.stream(messages, params, rp.execution)
        for delta in it:
            if delta.layer_usage:
                rp.layer_usage = delta.layer_usage
            yield delta

    async def agenerate(self, messages: list[dict], params: SamplingParams, rp: RequestPlan) -> Generation:
        if is_chain(rp.decision):
            messages = await chain_run.arun_before_last(self.system, self.router(rp.method), messages, params, rp.decision)
            rp.execution = chain_run.last_step_plan(self.system, rp.decision)
        gen, rp.execution = await self.system.agenerate(messages, params, rp.execution)
        if pending(rp.decision) and judge(rp.decision, query_text(messages), gen.text):
            first = gen
            gen, rp.execution = await self.system.agenerate(messages, params, self.system.plan(rp.decision))
            rp.decision.detail["verify"]["expert_completion_tokens"] = first.completion_tokens
        rp.layer_usage = gen.layer_usage
        if is_chain(rp.decision):
            chain_run.record_last(rp.decision, gen.text, rp.execution)
        return gen

    async def astream(self, messages: list[dict], params: SamplingParams, rp: RequestPlan):
        """Deltas; closing this generator closes the engine's stream (vLLM aborts the request). A chain
        runs its steps before the last one first (no deltas meanwhile), then streams the last step."""
        if is_chain(rp.decision):
            messages = await chain_run.arun_before_last(self.system, self.router(rp.method), messages, params, rp.decision)
            rp.execution = chain_run.last_step_plan(self.system, rp.decision)
        if pending(rp.decision):       # the answer is checked before any of it is sent: one delta, then the end
            for delta in _as_deltas(await self.agenerate(messages, params, rp)):
                yield delta
            return
        it, rp.execution = await self.system.astream(messages, params, rp.execution)
        text = []
        async with aclosing(it):
            async for delta in it:
                if delta.layer_usage:
                    rp.layer_usage = delta.layer_usage
                if is_chain(rp.decision):     # the last step's answer joins the explanation of the last chunk
                    text.append(delta.text or "")
                    if delta.finish_reason:
                        chain_run.record_last(rp.decision, "".join(text), rp.execution)
                yield delta


def _as_deltas(gen: Generation):
    yield StreamDelta(gen.text)
    yield StreamDelta("", gen.finish_reason, gen.prompt_tokens, gen.completion_tokens, layer_usage=gen.layer_usage,
                      cached_tokens=gen.cached_tokens)
