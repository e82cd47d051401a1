"""ESFT adapter vs the bare MoE base on its task, served through the MoE engine (issue 11).

python scripts/esft_demo.py --adapter NAME --task TASK [--n 20] [--out docs/results/moe/esft_demo.json]

Uses the configured pool (its current MoE base and the registered ESFT expert NAME), starts one MoE
engine, and answers the task's evaluation prompts (template and content shifts) with the bare MoE base
(`moe` plan) and with the adapter (`esft` plan) in one mixed batch per shift.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("docs/results/moe/esft_demo.json"))
    args = ap.parse_args()
    from moerge.config import get_settings
    from moerge.eval.harness import EVAL_SEED, max_tokens_for
    from moerge.models.generation import SamplingParams
    from moerge.router.base import ExpertScore, RoutingDecision
    from moerge.startup import attach_moe, start
    from moerge.tasks import get_task
    system = start(get_settings(), executor="reference", bundled=False, with_router=False)
    attach_moe(system, dict(cpu_threads="all", max_num_seqs=64))
    moe = system.local[1]
    moe.wait_ready(900)
    try:
        task = get_task(args.task)
        card = system.pool.get(args.adapter)
        p_moe = system.plan(RoutingDecision("moe", "moe"))
        p_esft = system.plan(RoutingDecision("pinned", "sequence", experts=[ExpertScore(card.name, 1.0)],
                                             chosen=[card.name]))
        out = {"adapter": card.name, "task": args.task, "n": args.n, "esft": card.extra.get("esft", {}),
               "moe_base": card.base_model, "shifts": {}}
        for shift in ("template", "content"):
            samples = task.samples(args.n, EVAL_SEED, "eval", shift)
            ids = [system.encode([{"role": "user", "content": s.prompt}]) for s in samples]
            params = SamplingParams(max_tokens=max_tokens_for(task, moe.tokenizer, samples))
            gens = moe.generate_many(ids + ids, params, [p_moe] * len(ids) + [p_esft] * len(ids))
            score = [task.score(g.text, s.answer) for g, s in zip(gens, samples + samples)]
            n = len(samples)
            out["shifts"][shift] = {"moe": sum(score[:n]) / n, "esft": sum(score[n:]) / n,
                                    "examples": [{"prompt": s.prompt, "answer": s.answer, "moe": gens[i].text,
                                                  "esft": gens[n + i].text} for i, s in enumerate(samples[:3])]}
            print(f"{shift}: moe {100 * out['shifts'][shift]['moe']:.0f}%, {card.name} "
                  f"{100 * out['shifts'][shift]['esft']:.0f}% (n={n})", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        system.shutdown()


if __name__ == "__main__":
    main()
