"""What every executor takes and returns."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from moerge.models.generation import Generation, SamplingParams, StreamDelta  # noqa: F401  (interim re-export until executors import moerge.models.generation)


class Executor(Protocol):
    name: str

    def generate(self, messages: list[dict], params: SamplingParams, plan=None) -> Generation: ...

    def stream(self, messages: list[dict], params: SamplingParams, plan=None) -> Iterator[StreamDelta]: ...
