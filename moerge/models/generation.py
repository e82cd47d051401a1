"""What a caller asks a generation engine for and what it gets back: sampling parameters,
a finished generation, and one streamed delta."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # token-level plans: {layer: {expert: share of routing mass}} measured while generating
    layer_usage: dict[int, dict[str, float]] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0      # prompt tokens whose KV the engine reused from its prefix cache


@dataclass
class StreamDelta:
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    layer_usage: dict[int, dict[str, float]] = field(default_factory=dict)   # on the final delta
    cached_tokens: int = 0                                                    # on the final delta
