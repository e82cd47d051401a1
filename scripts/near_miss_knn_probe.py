"""Can the embedder alone tell a near miss from a request of the expert's own task? (issue 15, part 2)

For every expert, the answered examples of its card (training samples of both recipes, library.json) are
embedded; an expert "accepts" a request when its max cosine to them is at least the 5% quantile of its
own examples' leave-one-template-out max cosines (a new phrasing of its own task). Printed per evaluation
task and shift: the share accepted (held-in: by the task's own expert; held-out: by the expert of highest
max cosine, with how often each expert was that one), and the mean max cosine.

    .venv/bin/python scripts/near_miss_knn_probe.py
"""

import numpy as np

from moerge.eval.harness import EVAL_SEED
from moerge.experts.build import ANSWERED_PER_SHIFT
from moerge.models.embedder import get_embedder
from moerge.tasks import HELD_IN, HELD_OUT, get_task


def main():
    emb = get_embedder()
    bank = {}
    for name in HELD_IN:
        ss = [s for sh in ("template", "content") for s in get_task(name).samples(ANSWERED_PER_SHIFT, 98, "train", sh)]
        m = emb.encode([s.prompt for s in ss])
        tid = np.array([s.template + (1000 if s.shift == "content" else 0) for s in ss])
        sims = m @ m.T
        loo = [float(sims[i][tid != tid[i]].max()) for i in range(len(ss))]
        bank[name] = (m, float(np.quantile(loo, 0.05)))
    print("| task | group | shift | accepted | mean max cosine | nearest expert (held-out) |")
    print("|---|---|---|---|---|---|")
    for group, tasks in (("held-in", HELD_IN), ("held-out", HELD_OUT)):
        for name in tasks:
            for shift in ("template", "content"):
                v = emb.encode([s.prompt for s in get_task(name).samples(50, EVAL_SEED, "eval", shift)])
                scores = {e: (m @ v.T).max(axis=0) for e, (m, _) in bank.items()}
                if group == "held-in":
                    tops = [name] * len(v)
                else:
                    tops = [max(scores, key=lambda e: scores[e][i]) for i in range(len(v))]
                best = [float(scores[t][i]) for i, t in enumerate(tops)]
                acc = np.mean([b >= bank[t][1] for b, t in zip(best, tops)])
                counts = {t: tops.count(t) for t in sorted(set(tops))} if group == "held-out" else ""
                print(f"| {name} | {group} | {shift} | {100 * acc:.0f}% | {np.mean(best):.3f} | {counts} |")


if __name__ == "__main__":
    main()
