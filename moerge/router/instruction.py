"""GLIDER's global step: an instruct LLM writes a one-sentence task instruction for a query.

Greedy decoding (deterministic), cached by normalised query in an LRU. The LLM is the base
model: the instruction names the *kind* of task ("Add two numbers."), which is what expert
cards describe, instead of the particulars of the query.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from collections.abc import Callable

SYSTEM = ("You describe tasks. Given a user request, reply with one short sentence saying what kind of "
          "task it is, as an instruction. Do not answer the request.")
# Seven requests from fields no bundled expert covers, each with a different kind of instruction. With
# three examples, one of them a factual question, the 135M writer copied "Answer a factual science
# question." for a third of the development prompts (training phrasings of the held-in tasks, seeds 777
# and 779) and its instruction alone found the right card for 59.7% of them; with these, 87.2%
# (scripts/probes/writer_fewshot.py). No example may name a task of the suite: the writer copies.
FEW_SHOT = [
    ("Translate 'good morning' into Spanish.", "Translate a phrase from English into Spanish."),
    ("Is the following email spam? 'You won a prize, click here'", "Classify an email as spam or not spam."),
    ("Write a Python function that checks whether a string is a palindrome.", "Write a short program."),
    ("Summarise this paragraph in one sentence: The meeting was moved to Friday because ...",
     "Summarise a text."),
    ("fix the grammar: me and him goes to school yesterday", "Correct the grammar of a sentence."),
    ("Who painted the Mona Lisa?", "Answer a question about art history."),
    ("Give me three ideas for a birthday party.", "Suggest ideas for an event."),
]


def normalise_query(q: str) -> str:
    return " ".join(q.lower().split())


class InstructionWriter:
    """`complete(messages, max_tokens) -> text` is the base model on the serving engine (greedy), so
    concurrent uncached routings share the engine's batches and no second copy of the model loads."""

    def __init__(self, complete: Callable[[list[dict], int], str], max_new_tokens: int = 24, cache_size: int = 4096,
                 complete_many: Callable[[list[list[dict]], int], list[str]] | None = None):
        self.complete = complete
        self.complete_many = complete_many
        self.max_new_tokens = max_new_tokens
        self._cache: OrderedDict[str, str] = OrderedDict()
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _messages(self, query: str) -> list[dict]:
        msgs = [{"role": "system", "content": SYSTEM}]
        for q, a in FEW_SHOT:
            msgs += [{"role": "user", "content": f"Request: {q}"}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": f"Request: {query}"})
        return msgs

    def _generate(self, query: str) -> str:
        return _first_line(self.complete(self._messages(query), self.max_new_tokens))

    def prime(self, queries: list[str]) -> int:
        """Write the instructions of every uncached query in one engine call (`complete_many`: batched on
        any engine), so the routings after it are cache hits; the number written. Each is the text one
        `write` would give (greedy, the same prompt)."""
        with self._lock:
            first: dict[str, str] = {}       # one query per cache key
            for q in queries:
                first.setdefault(normalise_query(q), q)
            todo = [q for k, q in first.items() if k not in self._cache]
        if not todo:
            return 0
        if self.complete_many is None:
            texts = [self._generate(q) for q in todo]
        else:
            texts = [_first_line(t) for t in self.complete_many([self._messages(q) for q in todo], self.max_new_tokens)]
        with self._lock:
            for q, text in zip(todo, texts):
                self.misses += 1
                self._cache[normalise_query(q)] = text
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return len(todo)

    def write(self, query: str) -> tuple[str, bool]:
        """(instruction, was_cached)."""
        key = normalise_query(query)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.hits += 1
                return self._cache[key], True
        text = self._generate(query)
        with self._lock:
            self.misses += 1
            self._cache[key] = text
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return text, False

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


def _first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()
