"""Shared shape of the sequence-level methods: score every expert, rank, abstain below a threshold."""

from __future__ import annotations

import time

from moerge.router.base import ExpertScore, Router, RoutingDecision


class SequenceRouter(Router):
    granularity = "sequence"

    def __init__(self, threshold: float | None = None, use_calibration: bool = True):
        self._threshold = threshold
        self.use_calibration = use_calibration

    @property
    def threshold(self) -> float | None:
        if self._threshold is not None:
            return self._threshold
        return self.ctx.threshold(self.name) if self.use_calibration else None

    def scores(self, query: str) -> tuple[list[tuple[str, float]], dict]:
        """[(name, score)] best first, and extra detail for the decision."""
        raise NotImplementedError

    def route(self, query, *, task=None):
        t0 = time.perf_counter()
        ranked, detail = self.scores(query)
        experts = [ExpertScore(n, s) for n, s in ranked]
        thr = self.threshold
        abstain = not experts or (thr is not None and experts[0].score < thr)
        decision = RoutingDecision(method=self.name, granularity=self.granularity, experts=experts,
                                   chosen=[] if abstain else [experts[0].name], abstained=abstain,
                                   instruction=detail.pop("instruction", None),
                                   detail={**detail, **({"threshold": thr} if thr is not None else {})})
        decision.latency_ms = (time.perf_counter() - t0) * 1000
        return decision
