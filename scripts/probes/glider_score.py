"""How glider-global combines its evidence: score formulas compared on development prompts only.

    .venv/bin/python scripts/probes/glider_score.py [--seeds 777 779 781 783] [--per 12]

Development prompts: each held-in expert's task, `--per` samples of its training phrasings over the template
lists and as many of its paraphrase family over the training content pool, per seed; the out-of-domain
set's calibration half (even lines; the evaluation half is not read). The instruction writer runs once per
prompt on the vLLM engine; every formula then reuses the same instructions and embeddings.

Per formula, printed: top-1 (the right card first) per shift; the share of in-domain prompts routed to the
right expert with the threshold `moerge calibrate` would fit (the middle of the best balanced-accuracy
interval), fitted on the first half of the seeds and measured on the second; the out-of-domain abstain rate
on the calibration half at that threshold; and the ROC AUC of in-domain top scores against out-of-domain
top scores (threshold-free separation).
"""
import argparse
from collections import defaultdict

import numpy as np

from moerge.config import get_settings
from moerge.router.calibrate import best_threshold, ood_split
from moerge.startup import start
from moerge.tasks import BY_NAME, out_of_domain_prompts

FORMULAS = {
    "query+both (current)": lambda q, b, i: 0.5 * (q + b),
    "query+both+instruction": lambda q, b, i: (q + b + i) / 3,
    "both": lambda q, b, i: b,
    "both+instruction": lambda q, b, i: 0.5 * (b + i),
    "query+instruction": lambda q, b, i: 0.5 * (q + i),
}


def auc(pos, neg) -> float:
    pos, neg = np.asarray(pos), np.asarray(neg)
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                 / (len(pos) * len(neg)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[777, 779, 781, 783])
    ap.add_argument("--per", type=int, default=12)
    args = ap.parse_args()
    system = start(get_settings(), executor="vllm", progress=lambda m: None)
    assert system.local[0].wait_ready(900)
    ctx = system.router_ctx
    w = ctx.instruction_writer
    rows = []
    for card in ctx.pool.list():
        t = BY_NAME.get((card.extra or {}).get("task"))
        if t is None or not t.held_in:
            continue
        for seed in args.seeds:
            for shift in ("template", "content"):
                rows += [dict(q=s.prompt, gold=card.name, seed=seed, shift=shift)
                         for s in t.samples(args.per, seed, "train", shift)]
    ood = ood_split(out_of_domain_prompts(), "calibration")
    rows += [dict(q=q, gold=None, seed=None, shift="ood") for q in ood]
    print(f"{sum(r['gold'] is not None for r in rows)} in-domain prompts, {len(ood)} out-of-domain; writing "
          "instructions", flush=True)
    w.prime([r["q"] for r in rows])
    names = sorted(ctx.vectors)
    cards = np.stack([ctx.vectors[n].card for n in names])
    for k, r in enumerate(rows):
        ins, _ = w.write(r["q"])
        qq, qb, qi = ctx.embed([r["q"], f"{ins}\n{r['q']}", ins])
        r["parts"] = (cards @ qq, cards @ qb, cards @ qi)
        if (k + 1) % 200 == 0:
            print(f"  embedded {k + 1}/{len(rows)}", flush=True)
    fit_seeds = set(args.seeds[:len(args.seeds) // 2])
    print("\n| formula | top-1 template | top-1 content | routed right (held-out seeds) | OOD abstain | AUC in vs OOD |")
    print("|---|---|---|---|---|---|")
    for name, f in FORMULAS.items():
        top1 = defaultdict(list)
        fit_in, chk, outs = [], [], []
        for r in rows:
            s = f(*r["parts"])
            best = int(np.argmax(s))
            if r["gold"] is None:
                outs.append(float(s[best]))
                continue
            right = names[best] == r["gold"]
            top1[r["shift"]].append(right)
            (fit_in if r["seed"] in fit_seeds else chk).append((float(s[best]), right))
        thr, _ = best_threshold([x for x, _ in fit_in], outs)
        routed = np.mean([ok and x >= thr for x, ok in chk])
        abstain = np.mean([x < thr for x in outs])
        sep = auc([x for x, _ in fit_in + chk], outs)
        print(f"| {name} | {100 * np.mean(top1['template']):.1f} | {100 * np.mean(top1['content']):.1f} | "
              f"{100 * routed:.1f} (thr {thr:.4f}) | {100 * abstain:.1f} | {sep:.4f} |", flush=True)
    system.shutdown()


if __name__ == "__main__":
    main()
