"""Running `verify` decisions in the evaluation (router/verify.py): the chosen experts' answers come
first (ordinary generations, cached like any other); every pending check is judged on its answer, and
the rejected rows are answered again by the base model, in one engine call. A rejected row's record
keeps the expert's answer under `verify`."""

from __future__ import annotations

from moerge.router.verify import judge, pending


def settle_checks(evaluator, samples, decisions, recs: list[dict], max_tokens: list[int]) -> list[dict]:
    rejected = [i for i, d in enumerate(decisions)
                if pending(d) and judge(d, samples[i].prompt, recs[i]["text"])]
    if not rejected:
        return recs
    again = evaluator.generate([samples[i] for i in rejected], [decisions[i] for i in rejected],
                               [max_tokens[i] for i in rejected])
    out = list(recs)
    for i, r in zip(rejected, again):
        first = recs[i]
        out[i] = {**r, "tokens": first["tokens"] + r["tokens"], "seconds": first["seconds"] + r["seconds"],
                  "verify": {"status": "rejected", "expert": decisions[i].detail["verify"]["expert"],
                             "expert_answer": first["text"]}}
    return out
