"""What every executor takes and returns."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False   # benchmarks: always generate max_tokens


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclass
class StreamDelta:
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Executor(Protocol):
    name: str

    def generate(self, messages: list[dict], params: SamplingParams, plan=None) -> Generation: ...

    def stream(self, messages: list[dict], params: SamplingParams, plan=None) -> Iterator[StreamDelta]: ...
