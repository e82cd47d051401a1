"""What the service holds while it runs: settings, the pool, the executor, and the plan for a request."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from moerge.config import Settings
from moerge.executors.base import Generation, SamplingParams
from moerge.experts.errors import UnknownExpertError
from moerge.experts.pool import ExpertPool


@dataclass
class Plan:
    """How one request is answered, and why (returned with every answer)."""

    method: str
    experts: list[dict] = field(default_factory=list)  # [{"name", "score"}], best first
    abstained: bool = False
    routing_ms: float = 0.0
    granularity: str = "sequence"
    note: str = ""

    def info(self) -> dict:
        return {"method": self.method, "granularity": self.granularity, "experts": self.experts,
                "abstained": self.abstained, "routing_ms": round(self.routing_ms, 3),
                **({"note": self.note} if self.note else {})}

    def headers(self) -> dict:
        return {"x-moerge-method": self.method,
                "x-moerge-experts": ",".join(e["name"] for e in self.experts)}


class Runtime:
    def __init__(self, settings: Settings, pool: ExpertPool, executor):
        self.settings = settings
        self.pool = pool
        self.executor = executor
        self._stats_lock = threading.Lock()
        self.stats = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def readiness(self) -> tuple[bool, dict]:
        return True, {"executor": self.executor.name}

    def model_ids(self) -> list[str]:
        return ["auto", "base", *self.pool.names()]

    def plan(self, model: str, messages: list[dict]) -> Plan:
        t0 = time.perf_counter()
        if model in ("auto", "base"):
            return Plan(method="base", routing_ms=(time.perf_counter() - t0) * 1000)
        raise UnknownExpertError(f"model {model!r} is not served here: use 'auto', 'base' or one of "
                                 "the names GET /v1/models lists")

    def generate(self, messages: list[dict], params: SamplingParams, plan: Plan) -> Generation:
        return self.executor.generate(messages, params, plan)

    def stream(self, messages: list[dict], params: SamplingParams, plan: Plan):
        return self.executor.stream(messages, params, plan)

    def observe(self, plan: Plan, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        with self._stats_lock:
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += prompt_tokens
            self.stats["completion_tokens"] += completion_tokens
