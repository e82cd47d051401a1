"""`verify`: route with a sequence router (`glider-global` by default), run the chosen expert, and check
its answer before it becomes the reply. An answer that hands back the request's own text, or text of
the request's own form, says the expert does not do what was asked: the typical near miss is the
inverse of the expert's skill, such as upper-casing asked to lower-case upper-case text (the answer is
the request's text), or ISO→US asked to turn a US date into ISO (the answer is a US date again). A
rejected answer is replaced by the base model's, and the decision records why.

Two checks:
- `copy`: the answer is a span of the request (case-sensitive, on word boundaries);
- `shape`: the answer's form (letters as X/x, digits as d, runs collapsed, punctuation kept: a US date
  is `d/d/d`) is the form of a span of the request. Only forms with a digit or a punctuation mark
  count: "x x x" (some lower-case words) says nothing.

Each check is learned per expert from its card's answered examples (prompts of its own task with the
right answer, `ExpertCard.answered_examples`). Some tasks' right answers are copies (a label the prompt
offers, "positive or negative?"; a list that is already sorted) or keep the request's form (a sorted
list), so a check runs for an expert only while the share of its answered examples it would reject,
smoothed (c + 1) / (n + 2), is at most `max_copy_rate`: while a rejection is rare when the expert is
right. An expert with fewer than `min_answered` answered examples is not checked, and the decision
says so.

It sees only near misses that copy the request or its form; one that does another transformation of
the same data (subtraction sent to the adder, the maximum sent to the sorter) passes. Executing the
check is the caller's (eval/verify.py, service/runtime.py): `pending` says a decision waits for its
answer, `judge` settles it.
"""

from __future__ import annotations

import re
import time

from moerge.router.base import Router, RoutingDecision, make_router

_EDGE = " \t\r\n\"'`“”‘’.,;:!?()[]{}<>*"
MIN_COPY_CHARS = 4         # letters or digits in the answer: "4" in "Add 0 and 4" is not a copy


def _flat(text: str) -> str:
    return " ".join(text.split())


def _core(answer: str, min_chars: int) -> str | None:
    """The answer without surrounding quotes, punctuation and whitespace; None below `min_chars` letters
    or digits (too short to say anything)."""
    a = _flat(answer).strip(_EDGE)
    return a if sum(c.isalnum() for c in a) >= min_chars else None


def copies(request: str, answer: str, min_chars: int = MIN_COPY_CHARS) -> bool:
    """True when the answer's core is a span of the request, matched case-sensitively on word boundaries."""
    a = _core(answer, min_chars)
    return a is not None and re.search(rf"(?<![0-9A-Za-z]){re.escape(a)}(?![0-9A-Za-z])", _flat(request)) is not None


def shape(text: str) -> str:
    """The form of `text`: upper-case letters X, lower-case x, digits d, each run collapsed to one; every
    other character kept ("12/25/2031" -> "d/d/d", "Hello, World" -> "Xx, Xx")."""
    out, prev = [], ""
    for ch in text:
        c = "X" if ch.isupper() else "x" if ch.islower() else "d" if ch.isdigit() else ch
        if c in "Xxd" and c == prev:
            continue
        out.append(c)
        prev = c
    return "".join(out)


def shape_copies(request: str, answer: str, min_chars: int = MIN_COPY_CHARS) -> bool:
    """True when the answer's form has a digit or a punctuation mark besides a lone number, and is the form
    of a span of the request, on form boundaries."""
    a = _core(answer, min_chars)
    if a is None:
        return False
    s = shape(a)
    if len(s) < 3 or not re.search(r"[^Xx ]", s) or set(s) <= {"d"}:
        return False
    return re.search(rf"(?<![Xxd]){re.escape(s)}(?![Xxd])", shape(_flat(request))) is not None


CHECKS = {"copy": copies, "shape": shape_copies}


def copy_rate(card, check: str = "copy") -> tuple[float, int]:
    """(smoothed share of the card's answered examples whose right answer `check` would reject, n)."""
    rows, fn = card.answered_examples, CHECKS[check]
    c = sum(fn(r.prompt, r.answer) for r in rows)
    return (c + 1) / (len(rows) + 2), len(rows)


class VerifyRouter(Router):
    name = "verify"
    granularity = "sequence"

    def __init__(self, router: str = "glider-global", max_copy_rate: float = 0.1, min_answered: int = 8,
                 **options):
        self.router_name, self.options = router, options
        self.max_copy_rate, self.min_answered = max_copy_rate, min_answered

    def fit(self, ctx):
        self.ctx = ctx
        self.base = make_router(self.router_name, ctx, **self.options)
        if self.base.granularity != "sequence" or self.base.name in ("chain", "verify"):
            raise ValueError(f"verify checks the answer of the one expert a sequence router chose; "
                             f"{self.router_name!r} is not such a router")
        return self

    def checks_for(self, name: str) -> tuple[list[str], dict[str, str]]:
        """(the checks that run on this expert's answers, why each other one does not)."""
        card = self.ctx.pool.registry.get(name)
        if card is None:
            return [], {c: "unknown expert" for c in CHECKS}
        on, off = [], {}
        for check in CHECKS:
            rate, n = copy_rate(card, check)
            if n < self.min_answered:
                off[check] = f"{n} answered examples on its card (checked from {self.min_answered})"
            elif rate > self.max_copy_rate:
                off[check] = f"its right answers fail this check too often ({rate:.2f} > {self.max_copy_rate})"
            else:
                on.append(check)
        return on, off

    def route(self, query, *, task=None):
        t0 = time.perf_counter()
        d = self.base.route(query, task=task)
        d.method = self.name
        check: dict = {"wrapped": self.router_name}
        if not d.chosen:
            check["status"] = "not run: no expert chosen"
        else:
            on, off = self.checks_for(d.chosen[0])
            check.update(status="pending" if on else "not run", expert=d.chosen[0], checks=on, skipped=off)
        d.detail = {**d.detail, "verify": check}
        d.latency_ms = (time.perf_counter() - t0) * 1000
        return d


def pending(decision: RoutingDecision | None) -> bool:
    return decision is not None and (decision.detail or {}).get("verify", {}).get("status") == "pending"


def judge(decision: RoutingDecision, request: str, answer: str) -> bool:
    """Settle a pending check on the expert's answer; True when it is rejected. A rejected decision
    becomes an abstention (the base model answers), with the expert's answer kept in the record."""
    check = decision.detail["verify"]
    failed = [c for c in check["checks"] if CHECKS[c](request, answer)]
    check["status"] = "rejected" if failed else "passed"
    if failed:
        check["failed"] = failed
        check["expert_answer"] = answer
        check["reason"] = ("the expert's answer is the request's own text" if "copy" in failed else
                           "the expert's answer has the form of the request's own data") + ": it did not do what was asked"
        decision.chosen, decision.abstained = [], True
    return bool(failed)
