"""`base`: no expert, the base model alone."""

from moerge.router.base import Router, RoutingDecision


class BaseRouter(Router):
    name = "base"
    granularity = "none"

    def route(self, query, *, task=None):
        return RoutingDecision(method=self.name, granularity=self.granularity, abstained=True)
