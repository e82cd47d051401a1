"""OpenAI-compatible request and response bodies (the subset moerge serves)."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = "auto"
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    ignore_eos: bool = False   # vLLM's extension: always generate max_tokens (benchmarks)

    @field_validator("temperature")
    @classmethod
    def _tiny_temperature_is_greedy(cls, v: float) -> float:
        # logits / 1e-115 overflow to inf and sampling fails; below 1e-4 sampling is greedy anyway
        return 0.0 if v < 1e-4 else v

    @field_validator("top_p")
    @classmethod
    def _tiny_top_p_keeps_the_top_token(cls, v: float) -> float:
        # below 1e-6 nucleus sampling keeps only the top token, as at 1e-6; under ~1e-45 it rounds to
        # 0 in float32 and keeps none
        return max(v, 1e-6)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def chat(self) -> list[dict]:
        role_map = {"developer": "system", "tool": "user"}
        return [{"role": role_map.get(m.role, m.role), "content": m.text()} for m in self.messages]


class FeedbackRequest(BaseModel):
    """`POST /v1/feedback`: how good a completion was. `score` in [0, 1] and/or a `label`
    (good/bad, correct/incorrect, positive/negative, ...), and/or a `correction` (the right answer)."""
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64, description="the chat completion's id (chatcmpl-...)")
    score: float | None = None
    label: str | None = Field(default=None, max_length=32)
    correction: str | None = Field(default=None, max_length=4000,
                                   description="the answer that would have been right: every local expert and "
                                               "the base model answer the request again and are scored against it")


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
