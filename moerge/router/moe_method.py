"""`moe`: the shared MoE base (`moerge moe build`) answering with its own router, token by token.

No expert is picked per request: the MoE base's router picks experts per token and per layer inside
the MoE engine. The plan is `moe`, which only the MoE engine runs.
"""

from moerge.router.base import Router, RoutingDecision


class MoeRouter(Router):
    name = "moe"
    granularity = "moe"

    def route(self, query, *, task=None):
        return RoutingDecision(method=self.name, granularity=self.granularity)
