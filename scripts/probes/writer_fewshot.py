"""Which few-shot examples the instruction writer (router/instruction.py) gets: measured on development
prompts only (training phrasings of each held-in task over the template lists and the training content
pool, seeds 777 and 779, 6 each) and the out-of-domain set (threshold fitted on its calibration half).

    .venv/bin/python scripts/probes/writer_fewshot.py three-examples diverse8 current

Prints, per variant: how often the instruction alone ranks the right card first, and glider-global's
share routed to the right expert (seed 779) with a threshold fitted on seed 777. About 4-5 min per
variant on the reference engine.
"""
import sys
from collections import Counter

import numpy as np

import moerge.router.instruction as I
from moerge.config import get_settings
from moerge.startup import start
from moerge.tasks import BY_NAME, out_of_domain_prompts
from moerge.router.calibrate import ood_split, best_threshold
SCIENCE = ("What is the boiling point of water in Fahrenheit?", "Answer a factual science question.")
VARIANTS = {
 "three-examples": (I.SYSTEM, I.FEW_SHOT[:2] + [SCIENCE]),   # the writer's examples until 2026-12-07
 "current": (I.SYSTEM, I.FEW_SHOT),
 # the current seven and the factual question the writer used to copy
 "diverse8": (I.SYSTEM, I.FEW_SHOT + [SCIENCE]),
}
sysm = start(get_settings(), executor="reference", progress=lambda m: None)
ctx = sysm.router_ctx
w = ctx.instruction_writer
rows = []
for card in ctx.pool.list():
    t = BY_NAME.get((card.extra or {}).get("task"))
    if t is None or not t.held_in: continue
    for seed in (777, 779):
        rows += [dict(q=s.prompt, gold=card.name, seed=seed) for s in t.samples(6, seed, "train")]
        rows += [dict(q=s.prompt, gold=card.name, seed=seed) for s in t.samples(6, seed, "train", "content")]
ood = out_of_domain_prompts()
rows += [dict(q=q, gold=None, seed=777) for q in ood_split(ood, "calibration")]
rows += [dict(q=q, gold=None, seed=779) for q in ood_split(ood, "evaluation")]
names = sorted(ctx.vectors)
for v in sys.argv[1:]:
    I.SYSTEM, I.FEW_SHOT = VARIANTS[v]
    texts = [I._first_line(t) for t in w.complete_many([w._messages(r["q"]) for r in rows], w.max_new_tokens)]
    for r, ins in zip(rows, texts):
        qq, qb, qi = ctx.embed([r["q"], f"{ins}\n{r['q']}", ins])
        r["ins"] = ins
        r["s_ins"] = {n: float(ctx.vectors[n].card @ qi) for n in names}
        r["s_g"] = {n: 0.5 * float(ctx.vectors[n].card @ qq) + 0.5 * float(ctx.vectors[n].card @ qb) for n in names}
    top = lambda d: max(d, key=d.get)
    ins_top1 = np.mean([top(r["s_ins"]) == r["gold"] for r in rows if r["gold"]])
    fit = [r for r in rows if r["seed"] == 777]; chk = [r for r in rows if r["seed"] == 779]
    thr, _ = best_threshold([max(r["s_g"].values()) for r in fit if r["gold"]], [max(r["s_g"].values()) for r in fit if not r["gold"]])
    rr = np.mean([top(r["s_g"]) == r["gold"] and max(r["s_g"].values()) >= thr for r in chk if r["gold"]])
    ab = np.mean([max(r["s_g"].values()) < thr for r in chk if not r["gold"]])
    c = Counter(r["ins"] for r in rows if r["gold"]).most_common(3)
    print(f"{v}: instruction-alone top1 {100*ins_top1:.1f}; glider routed-right (seed 779) {100*rr:.1f}, ood abstain {100*ab:.1f}, thr {thr:.3f}; most common {c}", flush=True)
