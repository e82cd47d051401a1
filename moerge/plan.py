"""Execution plans: what to run for a request, complete on its own, and the one place that turns a
routing decision into a plan and chooses the engine that runs it.

A `RoutingDecision` says which experts and why; an `ExecutionPlan` says what to compute. Executors
read plans and nothing else: they never see a router, never edit a decision, and never choose
another engine. When the preferred engine cannot run a plan, `make_plan` records the fallback and
its reason once, here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Literal

from moerge.experts.errors import ExpertError
from moerge.router.base import RoutingDecision

PlanKind = Literal["base", "adapter", "token_mixture", "static_mixture", "dense_delta", "remote", "moe", "esft"]
PLAN_KINDS: tuple[str, ...] = ("base", "adapter", "token_mixture", "static_mixture", "dense_delta", "remote", "moe",
                               "esft")
MOE_KINDS = frozenset({"moe", "esft"})     # run only by an engine serving the MoE base


class PlanError(ExpertError):
    """A plan that no engine here can run as asked (the message says what to change)."""
    status = 400


class EngineStartingError(PlanError):
    """The only engines that run this kind of plan are starting or restarting: try again shortly."""
    status = 503
    retry_after = 2


@dataclass(frozen=True)
class ExpertRef:
    """Everything an engine needs to load one LoRA expert: files and a version, never the card."""

    name: str
    version: str                     # sha256 of the adapter weights: a new version is a new identity
    adapter_dir: str
    rank: int
    gates: tuple[tuple[str, str], ...] = ()   # (gate set, safetensors path): "arrow", "gate"

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version[:16]}"

    def gate_path(self, gate_set: str) -> str | None:
        return dict(self.gates).get(gate_set)


@dataclass(frozen=True)
class RemoteTarget:
    name: str
    model: str
    api_base: str | None = None
    api_key_env: str | None = None
    path: str | None = None          # a local model folder (transformers) instead of a served model


@dataclass(frozen=True)
class ExecutionPlan:
    """One request's computation. Kinds and the fields they use:

    - base: nothing;
    - adapter: experts[0] with weight 1;
    - token_mixture: experts, gate_set ("arrow" | "gate"), gate_mode ("arrow" | "phatgoose" | "pooled"),
      bias (one per expert, added to the gate logits), module_bias (per module, the same), top_k,
      temperature; "pooled" gates by the module bias alone (no gate vectors: `joint`);
    - static_mixture: experts with fixed weights (linear and cat merges);
    - dense_delta: experts merged densely by `merge` (TIES);
    - remote: a whole model behind LiteLLM;
    - moe: the shared MoE base with its own router (no adapter);
    - esft: experts[0] is an ESFT adapter over the MoE base (its experts replace the base's, by rerouting).
    """

    kind: PlanKind
    experts: tuple[ExpertRef, ...] = ()
    weights: tuple[float, ...] = ()
    gate_set: str = ""
    gate_mode: str = ""
    bias: tuple[float, ...] = ()
    top_k: int = 2
    temperature: float = 1.0
    merge: str = ""
    remote: RemoteTarget | None = None
    # token_mixture: per module key ("3.attn", moerge.experts.joint_gates.module_key) a bias per expert,
    # added to that module's gate logits for every token; gate_mode "pooled" has no per-token term
    module_bias: tuple[tuple[str, tuple[float, ...]], ...] = ()
    engine: str = ""                 # "vllm" | "reference" | "remote"
    fallback: str = ""               # why `engine` is not the preferred one ("" when it is)

    @property
    def max_rank(self) -> int:
        return max((e.rank for e in self.experts), default=0)

    def signature(self) -> str:
        """A stable id of the computation (engine and fallback excluded): equal plans, equal tokens."""
        body = asdict(self)
        body.pop("engine"), body.pop("fallback")
        body["experts"] = [e.key for e in self.experts]
        body["bias"] = [round(b, 5) for b in self.bias]
        body["module_bias"] = [[k, [round(b, 5) for b in v]] for k, v in self.module_bias]
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]

    def info(self) -> dict:
        """The part of the routing explanation that says what ran, and where."""
        out: dict = {"plan": self.kind, "engine": self.engine}
        if self.experts and self.kind != "remote":
            out["plan_experts"] = [e.name for e in self.experts]
        if self.kind == "token_mixture":
            out["gating"] = {"gate_set": self.gate_set, "mode": self.gate_mode, "top_k": self.top_k,
                             "temperature": self.temperature}
        if self.fallback:
            out["fallback"] = self.fallback
        return out


@dataclass(frozen=True)
class EngineCaps:
    """What an engine can run, as data (plans sit below executors and cannot import them)."""

    name: str
    ready: bool = True
    kinds: frozenset[str] = frozenset(PLAN_KINDS) - {"remote"} - MOE_KINDS
    max_rank: int = 256
    max_experts: int = 1 << 30       # experts one plan may use at once
    not_ready_reason: str = "the engine is still starting"

    def refuses(self, plan: ExecutionPlan) -> str:
        """Why this engine cannot run the plan ("" when it can)."""
        if not self.ready:
            return f"{self.name}: {self.not_ready_reason}"
        if plan.kind not in self.kinds:
            return f"{self.name} does not run {plan.kind} plans"
        if plan.max_rank > self.max_rank:
            big = max(plan.experts, key=lambda e: e.rank)
            return (f"expert {big.name!r} has rank {big.rank}, above {self.name}'s max_lora_rank "
                    f"{self.max_rank}")
        if len(plan.experts) > self.max_experts:
            return (f"the plan uses {len(plan.experts)} experts, more than the {self.max_experts} "
                    f"{self.name} holds at once")
        return ""


@dataclass
class Engines:
    """The engines a caller has, in order of preference for LoRA plans (the first that accepts wins)."""

    local: list[EngineCaps] = field(default_factory=list)
    remote: bool = False


def expert_ref(pool, name: str, card=None) -> ExpertRef:
    card = card if card is not None else pool.get(name)
    if card.kind != "lora":
        raise PlanError(f"expert {name!r} is a {card.kind}, not a LoRA adapter: it cannot join a LoRA plan")
    gates = tuple((role, str(pool.store.path(card.artifacts[role]))) for role in ("arrow", "gate")
                  if role in card.artifacts)
    return ExpertRef(name=card.name, version=card.artifacts["adapter_weights"], adapter_dir=str(pool.adapter_dir(card)),
                     rank=int(card.rank or 0), gates=gates)


def esft_ref(pool, card) -> ExpertRef:
    return ExpertRef(name=card.name, version=card.artifacts["esft_weights"], adapter_dir=str(pool.esft_dir(card)),
                     rank=0)


def _refs(pool, names: list[str]) -> tuple[ExpertRef, ...]:
    """The plan's experts from one registry read (a token plan names every expert of the pool)."""
    if len(names) == 1:
        return (expert_ref(pool, names[0]),)
    cards = {c.name: c for c in pool.list()}
    return tuple(expert_ref(pool, n, cards.get(n)) for n in names)


def _lora_plan(decision: RoutingDecision, pool) -> ExecutionPlan:
    d = decision
    if d.granularity == "moe":
        return ExecutionPlan("moe")
    if d.abstained or not d.chosen:
        return ExecutionPlan("base")
    if d.granularity == "sequence":
        if len(d.chosen) != 1:
            refs = _refs(pool, d.chosen)
            return ExecutionPlan("static_mixture", refs, tuple(1.0 for _ in refs))
        card = pool.get(d.chosen[0])
        if card.kind == "model":
            return ExecutionPlan("remote", remote=RemoteTarget(card.name, card.model or "", card.api_base,
                                                               card.api_key_env, (card.extra or {}).get("path")))
        if card.kind == "esft":
            return ExecutionPlan("esft", (esft_ref(pool, card),))
        return ExecutionPlan("adapter", (expert_ref(pool, card.name),), (1.0,))
    if d.granularity == "static":
        refs = _refs(pool, d.chosen)
        merge = d.method.removeprefix("merge-")
        if merge == "ties":
            return ExecutionPlan("dense_delta", refs, merge="ties")
        w = 1.0 / len(refs) if merge == "linear" else 1.0
        return ExecutionPlan("static_mixture", refs, tuple(w for _ in refs), merge=merge)
    if d.granularity == "token":
        g = d.gating or {}
        gate_set = g.get("gate_set", "")
        refs = _refs(pool, d.chosen)
        pooled = g.get("mode") == "pooled"
        lacking = [] if pooled else [r.name for r in refs if r.gate_path(gate_set) is None]
        if pooled and not d.module_bias:
            raise PlanError("a pooled token plan needs a per-module bias (the `joint` router makes one)")
        if lacking:
            raise PlanError(f"gate set {gate_set!r} does not match the pool: expert(s) {lacking} have no "
                            f"{gate_set!r} vectors (train them with `moerge experts train-gate`, or route "
                            "with a method whose gates they have)")
        bias = tuple(float(d.bias.get(r.name, 0.0)) for r in refs) if d.bias else tuple(0.0 for _ in refs)
        module_bias = tuple((k, tuple(float(per.get(r.name, float("-inf"))) for r in refs))
                            for k, per in sorted(d.module_bias.items()))
        return ExecutionPlan("token_mixture", refs, gate_set=gate_set, gate_mode=g.get("mode", ""), bias=bias,
                             top_k=int(g.get("top_k", 2)), temperature=float(g.get("temperature", 1.0)),
                             module_bias=module_bias)
    raise PlanError(f"routing decision of unknown granularity {d.granularity!r}")


def make_plan(decision: RoutingDecision | None, pool, engines: Engines) -> ExecutionPlan:
    """The plan for a decision, on the first engine that accepts it; the fallback reason, if any, once."""
    plan = ExecutionPlan("base") if decision is None else _lora_plan(decision, pool)
    if plan.kind == "remote":
        if not engines.remote:
            raise PlanError(f"expert {plan.remote.name!r} is a whole model and this server has no remote executor")
        return _with(plan, engine="remote")
    reasons = []
    for caps in engines.local:
        why = caps.refuses(plan)
        if not why:
            return _with(plan, engine=caps.name, fallback="; ".join(reasons))
        reasons.append(why)
    if any(plan.kind in caps.kinds and not caps.ready for caps in engines.local):
        raise EngineStartingError("the engine for this plan is not ready: " + "; ".join(reasons) +
                                  "; send the request again shortly")
    raise PlanError("no engine here can run this plan: " + "; ".join(reasons))


def fallback_plan(plan: ExecutionPlan, reason: str, engines: Engines) -> ExecutionPlan:
    """The base-model plan that answers when `plan` failed at run time (a remote model down), with why."""
    base = make_plan(None, None, engines)
    return _with(base, fallback=f"{reason}; answered by the base model")


def _with(plan: ExecutionPlan, **changes) -> ExecutionPlan:
    from dataclasses import replace
    return replace(plan, **changes)
