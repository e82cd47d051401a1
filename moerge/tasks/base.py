"""What a task is: a seeded instance generator, prompt templates, and an exact scorer."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sample:
    task: str
    prompt: str
    answer: str
    template: int
    split: str


def normalise(text: str) -> str:
    """Collapse whitespace, strip one trailing period (TASKS.md scoring rules)."""
    text = " ".join(str(text).split())
    return text[:-1] if text.endswith(".") else text


def _parse_json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


@dataclass
class Task:
    name: str
    held_in: bool
    description: str                  # the expert card text for this task's expert
    make: Callable[[random.Random], tuple[dict, str]]  # rng -> (template fields, answer)
    train_templates: list[str]
    eval_templates: list[str]
    case_insensitive: bool = False
    json_answer: bool = False
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.held_in and len(self.train_templates) < 8:
            raise ValueError(f"{self.name}: needs at least 8 training templates")
        if len(self.eval_templates) < 4:
            raise ValueError(f"{self.name}: needs at least 4 evaluation templates")
        overlap = set(self.train_templates) & set(self.eval_templates)
        if overlap:
            raise ValueError(f"{self.name}: templates used in both splits: {overlap}")

    def templates(self, split: str) -> list[str]:
        return self.train_templates if split == "train" else self.eval_templates

    def samples(self, n: int, seed: int, split: str = "eval") -> list[Sample]:
        """n samples, deterministic in (task, seed, split); templates cycle evenly."""
        templates = self.templates(split)
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out = []
        for i in range(n):
            fields, answer = self.make(rng)
            t = (i + rng.randrange(len(templates))) % len(templates) if split == "train" else i % len(templates)
            out.append(Sample(self.name, templates[t].format(**fields), answer, t, split))
        return out

    def score(self, prediction: str, answer: str) -> bool:
        if self.json_answer:
            got = _parse_json(normalise(prediction)) or _parse_json(prediction.strip())
            return got is not None and got == json.loads(answer)
        p, a = normalise(prediction), normalise(answer)
        if self.case_insensitive:
            p, a = p.lower(), a.lower()
        return p == a


_WORD_RE = re.compile(r"\S+")


def count_words(sentence: str) -> int:
    return len(_WORD_RE.findall(sentence))
