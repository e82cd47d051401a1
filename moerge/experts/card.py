"""ExpertCard: what the pool knows about one expert."""

from __future__ import annotations

import json
import re
import time
import unicodedata
from typing import Literal

from pydantic import BaseModel, Field

from moerge.experts.errors import InvalidNameError

ExpertKind = Literal["lora", "model", "esft"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED_NAMES = {"auto", "base", "moerge"}


def check_name(name: str) -> str:
    """Return the name if it is safe as a model id and a file name; raise otherwise."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError("expert name is empty: pass --name with letters, digits, '.', '_' or '-'")
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise InvalidNameError(f"expert name {name!r} contains control characters: use printable "
                               "letters, digits, '.', '_' or '-'")
    if "/" in name or "\\" in name or ".." in name:
        raise InvalidNameError(f"expert name {name!r} contains a path separator or '..': "
                               "use letters, digits, '.', '_' or '-'")
    if not _NAME_RE.match(name):
        raise InvalidNameError(f"expert name {name!r} is not allowed: start with a letter or digit, "
                               "then up to 63 letters, digits, '.', '_' or '-'")
    if name.lower() in RESERVED_NAMES or name.startswith("moerge:"):
        raise InvalidNameError(f"expert name {name!r} is reserved: choose another")
    return name


MAX_ANSWERED_EXAMPLES = 256


class AnsweredExample(BaseModel):
    """A prompt of the expert's task and the answer the expert should give: what `verify` (router/verify.py)
    learns from whether this expert's right answers ever hand the request's own text back."""
    prompt: str = Field(min_length=1, max_length=4000)
    answer: str = Field(max_length=4000)


class ExpertCard(BaseModel):
    name: str
    kind: ExpertKind
    base_model: str
    description: str = ""
    tags: list[str] = Field(default_factory=list)
    examples: list[str] = Field(default_factory=list)
    answered_examples: list[AnsweredExample] = Field(default_factory=list, max_length=MAX_ANSWERED_EXAMPLES)
    # artifact role -> sha256 digest in the content-addressed store
    # (roles: adapter_config, adapter_weights, arrow, card_embedding, example_embeddings, gate, model_ref)
    artifacts: dict[str, str] = Field(default_factory=dict)
    # for kind=model: litellm model string, api_base and the *name* of an env var holding the key
    model: str | None = None
    api_base: str | None = None
    api_key_env: str | None = None
    rank: int | None = None
    target_modules: list[str] = Field(default_factory=list)
    extra: dict = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)

    def card_text(self) -> str:
        """The text that is embedded for semantic routing."""
        parts = [self.description.strip()]
        if self.tags:
            parts.append("Tags: " + ", ".join(self.tags))
        return "\n".join(p for p in parts if p)

    def to_row(self) -> dict:
        return {"name": self.name, "kind": self.kind, "created_at": self.created_at,
                "body": json.dumps(self.model_dump(), sort_keys=True)}

    @classmethod
    def from_row(cls, body: str) -> "ExpertCard":
        return cls.model_validate_json(body)
