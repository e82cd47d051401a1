"""`oracle`: the expert trained on the request's task (needs the task label; an eval upper bound)."""

from moerge.router.base import ExpertScore, Router, RoutingDecision


class OracleRouter(Router):
    name = "oracle"

    def route(self, query, *, task=None):
        if task is None:
            raise ValueError("the oracle router needs the task label (it exists for evaluation only)")
        owners = [c.name for c in self.ctx.pool.list() if (c.extra or {}).get("task") == task]
        if not owners:  # a held-out task: no expert of its own
            return RoutingDecision(method=self.name, granularity="sequence", abstained=True,
                                   detail={"task": task})
        return RoutingDecision(method=self.name, granularity="sequence", experts=[ExpertScore(owners[0], 1.0)],
                               chosen=[owners[0]], detail={"task": task})
