"""Static merges of all LoRA experts, as baselines: every request gets the same merge of
every LoRA expert in the pool. The merge maths are in moerge/kernels/merge.py.
"""

from __future__ import annotations

from moerge.router.base import Router, RoutingDecision


class MergeRouter(Router):
    granularity = "static"

    def route(self, query, *, task=None):
        names = [c.name for c in self.ctx.pool.list() if c.kind == "lora"]
        return RoutingDecision(method=self.name, granularity="static", chosen=names, abstained=not names,
                               detail={"merge": self.name.removeprefix("merge-")})


class MergeLinearRouter(MergeRouter):
    name = "merge-linear"


class MergeTiesRouter(MergeRouter):
    name = "merge-ties"


class MergeCatRouter(MergeRouter):
    name = "merge-cat"
