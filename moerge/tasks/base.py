"""What a task is: a seeded instance generator, prompt templates, and an exact scorer."""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field


SHIFTS = ("template", "content")


@dataclass(frozen=True)
class Sample:
    task: str
    prompt: str
    answer: str
    template: int
    split: str
    shift: str = "template"
    content: tuple[str, ...] = ()     # the content keys ("kind:key") of the content pools it used


def normalise(text: str) -> str:
    """Collapse whitespace, strip one trailing period (docs/TASKS.md scoring rules)."""
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
    # rng, pool -> (template fields, answer, content keys): the broad pools of tasks/content.py
    make_content: Callable[[random.Random, str], tuple[dict, str, tuple[str, ...]]] | None = None
    paraphrases: list[str] = field(default_factory=list)  # generated into more training templates

    def __post_init__(self):
        if self.held_in and len(self.train_templates) < 8:
            raise ValueError(f"{self.name}: needs at least 8 training templates")
        if len(self.eval_templates) < 4:
            raise ValueError(f"{self.name}: needs at least 4 evaluation templates")
        overlap = set(self.train_templates) & set(self.eval_templates)
        if overlap:
            raise ValueError(f"{self.name}: templates used in both splits: {overlap}")

    @functools.cached_property
    def family_templates(self) -> list[str]:
        """The hand-written training templates plus the generated paraphrase family (an evaluation
        template is never among them, case-insensitively)."""
        banned = {t.lower() for t in self.eval_templates} | {t.lower() for t in self.train_templates}
        extra = [t for t in expand_paraphrases(self.paraphrases) if t.lower() not in banned]
        return list(self.train_templates) + list(dict.fromkeys(extra))

    def templates(self, split: str, shift: str = "template") -> list[str]:
        if split == "eval":
            return self.eval_templates
        return self.family_templates if shift == "content" else self.train_templates

    def samples(self, n: int, seed: int, split: str = "eval", shift: str = "template") -> list[Sample]:
        """n samples, deterministic in (task, split, shift, seed); templates cycle evenly.

        - train, shift "template": the hand-written training templates over the template lists
          (vocab.py): the first library's recipe, kept so it can be rebuilt;
        - train, shift "content": the paraphrase family over the training pool (tasks/content.py);
        - eval, shift "template": evaluation templates over the template lists;
        - eval, shift "content": evaluation templates over the evaluation pool, which no
          training sample of the content recipe draws from.
        """
        if split not in ("train", "eval"):
            raise ValueError(f"unknown split {split!r}; splits are train, eval")
        if shift not in SHIFTS:
            raise ValueError(f"unknown shift {shift!r}; shifts are {', '.join(SHIFTS)}")
        templates = self.templates(split, shift)
        if not templates or (shift == "content" and self.make_content is None):
            raise ValueError(f"{self.name} has no {split} templates or pools (held-out tasks are never trained on)")
        pool = None if shift == "template" else ("train" if split == "train" else "eval")
        key = f"{self.name}/{split}/{seed}" if shift == "template" else f"{self.name}/{split}/{shift}/{seed}"
        rng = random.Random(key)
        out = []
        for i in range(n):
            if pool is None:
                (fields, answer), content = self.make(rng), ()
            else:
                fields, answer, content = self.make_content(rng, pool)
            t = (i + rng.randrange(len(templates))) % len(templates) if split == "train" else i % len(templates)
            out.append(Sample(self.name, templates[t].format(**fields), answer, t, split, shift, tuple(content)))
        return out

    def score(self, prediction: str, answer: str) -> bool:
        if self.json_answer:
            got = _parse_json(normalise(prediction)) or _parse_json(prediction.strip())
            return got is not None and got == json.loads(answer)
        p, a = normalise(prediction), normalise(answer)
        if self.case_insensitive:
            p, a = p.lower(), a.lower()
        return p == a


PREFIXES = ("", "Please ", "Can you ", "Could you please ", "I need you to ", "Task: ", "Hey, ",
            "Quick one: ", "Help me out and ")


def expand_paraphrases(phrases: list[str]) -> list[str]:
    """A paraphrase family: every instruction phrase under every polite or terse prefix.
    Phrases are written as imperatives ("convert {s} to upper case"); the prefix decides the case
    of the first letter."""
    out = []
    for p in phrases:
        if p.startswith("{"):          # the data first, then the instruction: no prefix
            out.append(p)
            continue
        for pre in PREFIXES:
            lead = pre in ("", "Task: ", "Quick one: ")
            out.append(pre + (p[0].upper() if lead else p[0].lower()) + p[1:])
    return out


_WORD_RE = re.compile(r"\S+")


def count_words(sentence: str) -> int:
    return len(_WORD_RE.findall(sentence))
