"""The one protocol every executor implements: it takes an execution plan and runs it.

An executor never sees a router or a routing decision, never edits anything it is given, and never
hands a plan to another executor: choosing the engine (and any fallback) is `moerge.plan`'s job.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from moerge.models.generation import Generation, SamplingParams, StreamDelta
from moerge.plan import EngineCaps, ExecutionPlan


@runtime_checkable
class Executor(Protocol):
    name: str

    def ready(self) -> bool: ...

    def caps(self) -> EngineCaps: ...

    def describe(self) -> dict: ...

    def generate(self, messages: list[dict], params: SamplingParams, plan: ExecutionPlan) -> Generation: ...

    def stream(self, messages: list[dict], params: SamplingParams, plan: ExecutionPlan) -> Iterator[StreamDelta]: ...
