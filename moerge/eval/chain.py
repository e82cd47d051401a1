"""Running `chain` decisions in the evaluation: step by step, every sample's step k in one engine call,
so vLLM batches them. Each step is an ordinary generation (cached by plan and prompt like any other);
a sample's record is its last step's, with the tokens and time of every step added up."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from moerge.router.chain import is_chain, record_step, settle, step_decision, step_prompt

# an intermediate answer may be longer than the task's final one (a sum before it is spelled out is not,
# a reversed sentence before upper-casing is as long): the step budget is at least this many tokens
MIN_STEP_TOKENS = 48


@dataclass(frozen=True)
class StepPrompt:
    prompt: str


def generate_with_chains(evaluator, samples, decisions, max_tokens: list[int], router=None) -> list[dict]:
    """`evaluator.generate`, except that a chain decision runs its steps in order, each step after the
    first routed again by `router` (the ChainRouter) on its real input; its record adds `chain` (each
    step's expert, prompt and answer)."""
    plain = [i for i, d in enumerate(decisions) if not is_chain(d)]
    out: list[dict | None] = [None] * len(samples)
    if plain:
        for i, r in zip(plain, evaluator.generate([samples[i] for i in plain], [decisions[i] for i in plain],
                                                  [max_tokens[i] for i in plain])):
            out[i] = r
    chained = [i for i, d in enumerate(decisions) if is_chain(d)]
    answers: dict[int, str | None] = {i: None for i in chained}
    totals = {i: {"tokens": 0, "seconds": 0.0, "engines": set()} for i in chained}
    depth = max((len(decisions[i].detail["chain"]) for i in chained), default=0)
    for k in range(depth):
        rows = [i for i in chained if k < len(decisions[i].detail["chain"])]
        steps = [decisions[i].detail["chain"][k] for i in rows]
        prompts = [step_prompt(st, answers[i]) for i, st in zip(rows, steps)]
        if k > 0 and router is not None:     # the instruction writer's generations share the engine's batches
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda sp: router.route_step(*sp), zip(steps, prompts)))
        last = [k == len(decisions[i].detail["chain"]) - 1 for i in rows]
        budget = [max_tokens[i] if fin else max(max_tokens[i], MIN_STEP_TOKENS) for i, fin in zip(rows, last)]
        recs = evaluator.generate([StepPrompt(p) for p in prompts], [step_decision(st) for st in steps], budget)
        for i, st, p, r, fin in zip(rows, steps, prompts, recs, last):
            record_step(st, p, r["text"])
            answers[i] = r["text"]
            totals[i]["tokens"] += r["tokens"]
            totals[i]["seconds"] += r["seconds"]
            totals[i]["engines"].add(r.get("engine", "reference"))
            if fin:
                settle(decisions[i])
                out[i] = {**r, "tokens": totals[i]["tokens"], "seconds": totals[i]["seconds"],
                          "chain": [{"expert": s["expert"], "score": s["score"], "prompt": s["prompt"],
                                     "answer": s["answer"]}
                                    for s in decisions[i].detail["chain"]]}
    return out  # type: ignore[return-value]
