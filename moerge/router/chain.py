"""`chain`: a request that asks for two or more skills in sequence ("reverse the words, then upper-case
them") is answered by chaining experts: step 1's expert answers the first instruction, its answer is
the data of step 2, and so on; the last answer is the reply.

Decomposition (router/decompose.py) proposes cuts at sequencing connectives; the wrapped sequence
router (`glider-global` by default, with its calibrated abstain threshold) routes every piece, and
a cut is kept only where the skills on its two sides differ. A piece the router abstains on is part
of its neighbour's instruction, or, at the end and not referring back to an answer, the request's
data ("How many words are in this text? Then spell the count out. the cat sat"). A last piece after
"then" (or the like) that refers back ("..., then tell me a joke about it") and fits no expert is a
base-model step. Pieces without two words of letters ("367.") are data, never steps. A request
that does not split into two steps is routed exactly as the wrapped router routes it.

The decision's `detail["chain"]` is the plan and the explanation: each step's text, expert (None:
the base model), score, and once run, the prompt it got and its answer. Executing it is the caller's
(service/chain.py, eval/chain.py): `step_prompt` builds a step's input, `route_step` routes a step
after the first again on that input (the expert chosen up front stays as `planned`), and
`step_decision` says what the step runs.
"""

from __future__ import annotations

import time

from moerge.router.base import ExpertScore, Router, RoutingDecision, make_router
from moerge.router.decompose import (Parts, carry, first_prompt, is_instruction, neutral, refers_back, segments,
                                     split_payload)


class ChainRouter(Router):
    name = "chain"
    granularity = "sequence"

    def __init__(self, router: str = "glider-global", max_steps: int = 4, **options):
        self.router_name, self.max_steps, self.options = router, max_steps, options

    def fit(self, ctx):
        self.ctx = ctx
        self.base = make_router(self.router_name, ctx, **self.options)   # the wrapped sequence router
        if self.base.granularity != "sequence":
            raise ValueError(f"chain routes each step with a sequence router, not {self.router_name!r}")
        return self

    def route(self, query, *, task=None):
        t0 = time.perf_counter()
        single = self.base.route(query, task=task)
        steps, parts = self.decompose(query)
        if steps is None:
            single.method = self.name
            single.detail = {**single.detail, "wrapped": self.router_name, "chain": None}
            single.latency_ms = (time.perf_counter() - t0) * 1000
            return single
        experts = [s["expert"] for s in steps if s["expert"]]
        decision = RoutingDecision(
            method=self.name, granularity=self.granularity,
            experts=[ExpertScore(s["expert"] or "(base)", s["score"]) for s in steps],
            chosen=experts, abstained=False, instruction=single.instruction,
            detail={"wrapped": self.router_name, "chain": steps,
                    "payload": parts.payload, "payload_form": parts.form or None,
                    "single": {"chosen": single.chosen, "abstained": single.abstained}})
        decision.latency_ms = (time.perf_counter() - t0) * 1000
        return decision

    def route_step(self, step: dict, prompt: str) -> None:
        """Route step k > 1 again once its real input exists (its instruction and step k-1's answer):
        an expert's score is the mean of its score for the instruction alone (when the request was
        routed) and for the real input, under the wrapped router's abstain threshold. The input says
        what the data is ("write out in letters: 1573" is a number to spell), the instruction says what
        to do with it ("write in upper case: Copenhagen" is not a question about capitals). The expert
        chosen up front stays in the explanation as `planned`."""
        d = self.base.route(prompt)
        by_input = {e.name: e.score for e in d.experts}
        by_text = step.pop("scores", None) or {}
        names = set(by_input) | set(by_text)
        if not names:
            return
        both = {n: 0.5 * (by_text.get(n, 0.0) + by_input.get(n, 0.0)) for n in names}
        best = max(sorted(names), key=lambda n: both[n])
        thr = self.base.threshold
        step["planned"] = {"expert": step["expert"], "score": step["score"]}
        step["expert"] = None if thr is not None and both[best] < thr else best
        step["score"], step["routed_on"] = round(both[best], 6), "instruction and input"

    def _route_piece(self, text: str) -> tuple[str | None, float, dict[str, float]]:
        """(expert or None, top score, every expert's score)."""
        d = self.base.route(text)
        top = d.experts[0].score if d.experts else 0.0
        return (None if d.abstained or not d.chosen else d.chosen[0]), float(top), \
            {e.name: round(float(e.score), 6) for e in d.experts}

    def decompose(self, query: str) -> tuple[list[dict] | None, Parts]:
        """The steps (dicts, in order) or None when the request is one step."""
        parts = split_payload(query)
        segs = segments(parts.instruction)
        if len(segs) < 2:
            return None, parts
        # data-only pieces ("367.") are not routed; later pieces are routed on their neutral form
        routed = [self._route_piece(s.text if k == 0 else neutral(s.text)) if is_instruction(s.text) else (None, 0.0, {})
                  for k, s in enumerate(segs)]
        last_expert = routed[-1][0]
        if parts.payload is None and last_expert is None and not refers_back(segs[-1].text):
            # trailing data set apart by a sentence end: the first step's input
            parts = Parts(parts.instruction[:segs[-1].start].rstrip(), segs[-1].text, "sentence")
            segs, routed = segs[:-1], routed[:-1]
        groups: list[dict] = []          # {"start", "end", "expert" (None: base), "score", "scores"}
        pending = None                   # an abstained piece before any step: joins the next
        for k, (seg, (expert, score, _)) in enumerate(zip(segs, routed)):
            is_last = k == len(segs) - 1
            # a base-model step: the last piece, after "then" (or the like), working on the answer
            base_step = is_last and groups and seg.boundary == "strong" and refers_back(seg.text) \
                and is_instruction(seg.text)
            if expert is None and not base_step:
                if groups:
                    groups[-1]["end"] = seg.end
                elif pending is None:
                    pending = seg.start
                continue
            if groups and expert is not None and groups[-1]["expert"] == expert:
                groups[-1]["end"], groups[-1]["score"] = seg.end, max(groups[-1]["score"], score)
                continue
            start = pending if pending is not None else seg.start
            pending = None
            groups.append({"start": start, "end": seg.end, "expert": expert, "score": score, "scores": routed[k][2]})
        if len(groups) < 2 or not any(g["expert"] for g in groups) or len(groups) > self.max_steps:
            return None, parts
        steps = []
        for i, g in enumerate(groups):
            text = _whole_first(parts.instruction, g) if i == 0 else \
                parts.instruction[g["start"]:g["end"]].strip().rstrip(",;")
            steps.append({"step": i + 1, "text": text, "expert": g["expert"], "score": round(g["score"], 6),
                          "input": "request" if i == 0 else ("refers back" if refers_back(text) else "appended"),
                          "prompt": first_prompt(text, parts) if i == 0 else None, "answer": None,
                          **({"scores": g["scores"]} if i > 0 else {})})
        return steps, parts


def _whole_first(instruction: str, group: dict) -> str:
    """The first step's instruction, without a leading "First," or "To start,"."""
    text = instruction[group["start"]:group["end"]].strip().rstrip(",;")
    lead = segments(text)
    return text[lead[0].start:].strip() if lead else text


def is_chain(decision: RoutingDecision | None) -> bool:
    return bool(decision is not None and decision.detail.get("chain"))


def step_decision(step: dict) -> RoutingDecision:
    """What one step runs: its expert, pinned, or the base model."""
    if not step["expert"]:
        return RoutingDecision("chain", "none", abstained=True)
    return RoutingDecision("chain", "sequence", experts=[ExpertScore(step["expert"], step["score"])],
                           chosen=[step["expert"]])


def step_prompt(step: dict, previous_answer: str | None) -> str:
    """Step 1's prompt was built when routing; step k > 1 carries step k-1's answer (decompose.carry)."""
    if step["step"] == 1 or previous_answer is None:
        return step["prompt"]
    return carry(step["text"], previous_answer)


def settle(decision: RoutingDecision) -> None:
    """After a chain ran: `chosen` and `experts` name the experts its steps really used, in order."""
    steps = decision.detail["chain"]
    decision.chosen = [s["expert"] for s in steps if s["expert"]]
    decision.experts = [ExpertScore(s["expert"] or "(base)", s["score"]) for s in steps]


def record_step(step: dict, prompt: str, answer: str, plan_info: dict | None = None) -> None:
    step["prompt"], step["answer"] = prompt, answer
    if plan_info:
        step["plan"] = plan_info.get("plan")
        step["engine"] = plan_info.get("engine")
