"""Calibrate abstain thresholds of the sequence-level routers.

For each method, the top score on out-of-domain prompts (which should abstain) and on
in-domain prompts (which should route) are collected; the threshold is the middle of the
interval that maximises balanced accuracy (mean of abstain rate on out-of-domain and keep
rate on in-domain). Only the calibration half of the out-of-domain set is used (even
lines); the other half stays unseen for evaluation.
"""

from __future__ import annotations

import numpy as np

from moerge.models.generation import SamplingParams
from moerge.router.base import make_router
from moerge.router.context import Calibration

SEQUENCE_METHODS = ("embed", "retrieval", "glider-global")


def ood_split(prompts: list[str], part: str) -> list[str]:
    """'calibration' = even positions, 'evaluation' = odd positions."""
    return prompts[0::2] if part == "calibration" else prompts[1::2]


def best_threshold(in_scores: list[float], out_scores: list[float]) -> tuple[float, float]:
    """(threshold, balanced accuracy): route when top score >= threshold."""
    cands = sorted(set(in_scores) | set(out_scores))
    cuts = [cands[0] - 1e-6] + [(a + b) / 2 for a, b in zip(cands, cands[1:])] + [cands[-1] + 1e-6]
    ins, outs = np.array(in_scores), np.array(out_scores)
    accs = [0.5 * ((ins >= c).mean() + (outs < c).mean()) for c in cuts]
    best = max(accs)
    good = [c for c, a in zip(cuts, accs) if a >= best - 1e-12]
    return float((good[0] + good[-1]) / 2), float(best)


def in_domain_prompts(pool, per_expert: int = 12) -> list[str]:
    """Fresh prompts for each expert: when the expert names a known task, `per_expert` from its task's
    training templates over the template lists and, when the task has content pools, as many from its
    paraphrase family over the *training* pool (new words, numbers and entities, as users send: the
    threshold must not sit just under the scores of the lists the cards' examples were drawn from);
    else its stored example prompts. Evaluation templates and the evaluation pool are never used."""
    from moerge.tasks import BY_NAME
    out = []
    for card in pool.list():
        task = BY_NAME.get((card.extra or {}).get("task"))
        if task is not None and task.held_in:
            out += [s.prompt for s in task.samples(per_expert, 777, "train")]
            if task.make_content is not None:
                out += [s.prompt for s in task.samples(per_expert, 777, "train", "content")]
        else:
            out += card.examples[:per_expert]
    return out


def calibrate(ctx, ood_prompts: list[str], methods=SEQUENCE_METHODS) -> Calibration:
    cal = Calibration(thresholds={}, detail={})
    in_prompts = in_domain_prompts(ctx.pool)
    out_prompts = ood_split(ood_prompts, "calibration")
    if ctx.instruction_writer is not None and "glider-global" in methods:
        ctx.instruction_writer.prime(in_prompts + out_prompts)     # one batched engine call, not one per prompt
    for m in methods:
        router = make_router(m, ctx, use_calibration=False)
        ins = [router.route(q).experts[0].score for q in in_prompts]
        outs = [router.route(q).experts[0].score for q in out_prompts]
        thr, bal = best_threshold(ins, outs)
        cal.thresholds[m] = round(thr, 6)
        cal.detail[m] = {"balanced_accuracy": round(bal, 4), "n_in": len(ins), "n_out": len(outs),
                         "in_route_rate": round(float(np.mean(np.array(ins) >= thr)), 4),
                         "out_abstain_rate": round(float(np.mean(np.array(outs) < thr)), 4)}
    return cal


ALPHA_GRID = (1.0, 3.0, 10.0, 30.0, 100.0)


def calibrate_alpha(ctx, answer, tokenizer, *, alphas=ALPHA_GRID, per_task: int = 12, seed: int = 778,
                    batch_size: int = 16, progress=None) -> tuple[float | None, dict]:
    """Choose glider's α on development prompts: each held-in expert's task, `per_task` fresh samples of
    its *training* templates over the template lists and, when the task has content pools, as many of its
    paraphrase family over the *training* pool (the evaluation paraphrases, the evaluation pool and the
    held-out tasks are never used). 4 per task over the template lists alone (48 prompts) could not tell
    α = 30 from 100 on today's library (81.2% each).

    `answer(router, prompts, params) -> list[str]` is the caller's engine: it answers the user
    prompts, each routed by `router`, with `params` (greedy). `tokenizer` sizes the answers.
    Every α in `alphas` answers the same prompts; the α with the highest accuracy wins, ties
    going to the smaller α (more room for token routing, which is what helps unseen tasks in
    GLIDER). Returns (α, {α: accuracy, ...}); (None, {}) when the pool has no expert with a
    known task.
    """
    from moerge.router.glider import GliderRouter
    from moerge.tasks import BY_NAME

    samples = []
    for card in ctx.pool.list():
        task = BY_NAME.get((card.extra or {}).get("task"))
        if card.kind == "lora" and task is not None and task.held_in:
            samples += [(task, s) for s in task.samples(per_task, seed, "train")]
            if task.make_content is not None:
                samples += [(task, s) for s in task.samples(per_task, seed, "train", "content")]
    if not samples:
        return None, {}
    max_tokens = max(len(tokenizer(s.answer)["input_ids"]) for _, s in samples) + 6
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    scores: dict[str, float] = {}
    for a in alphas:
        router = GliderRouter(alpha=float(a)).fit(ctx)
        correct = 0
        for j in range(0, len(samples), batch_size):
            chunk = samples[j:j + batch_size]
            texts = answer(router, [s.prompt for _, s in chunk], params)
            correct += sum(t.score(text, s.answer) for (t, s), text in zip(chunk, texts))
        scores[f"{float(a):g}"] = round(correct / len(samples), 4)
        if progress:
            progress(f"glider α={a:g}: {scores[f'{float(a):g}']:.3f} on {len(samples)} development prompts")
    best = max(scores.values())
    chosen = min(float(a) for a, acc in scores.items() if acc >= best - 1e-12)
    return chosen, {"accuracy_by_alpha": scores, "n": len(samples), "per_task": per_task, "seed": seed}
