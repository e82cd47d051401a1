"""`moerge eval --feedback-curve`: does routing learn from outcomes?

For every task, prompts are streamed to the `feedback` router (exploring: Thompson sampling over
the wrapped router's top few experts plus base), answered, scored with the task's exact scorer,
and the score is sent back as feedback (through the same FeedbackStore the service's
`POST /v1/feedback` writes). Tasks are streamed together, one prompt of each per round, over one
store: what is learnt on one task can help or hurt another, as in a shared service.

The stream never touches evaluation phrasings or evaluation content:
- held-in tasks stream their training templates over the template lists
  (`Task.samples(k, seed, "train", "template")`: what the experts trained on);
- held-out tasks have no training templates, so the stream uses `STREAM_TEMPLATES` below, written
  for this purpose and checked disjoint (case-insensitively) from the task's evaluation
  templates, over the task's *training* content pool (`make_content(rng, "train")`).

With `kind="correction"` the feedback is the task's reference answer instead of the score: the
store answers the stream prompt again with every expert and the base model (pinned, greedy, through
the same generation cache) and scores each against it with the service's task-blind comparison
(`answer_matches`), as `POST /v1/feedback` with `correction` does. The scorer's score of the arm that
answered is what the stream records.

Every `every` feedbacks per task, a non-exploring `feedback` router (posterior mean) over the
same feedback answers `n` fresh evaluation prompts per task (the evaluation split, the same
samples `moerge eval` scores); generations are cached like the harness's. The best single expert
of each held-out task on those same prompts is the line to reach.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moerge.eval.cache import GenerationCache
from moerge.eval.harness import EVAL_SEED, Evaluator, _chosen_counts, max_tokens_for
from moerge.router.feedback import (BASE_ARM, FeedbackRouter, arm_decision, plan_record, replay_arms,
                                    replay_max_tokens, store_for)
from moerge.tasks import HELD_OUT, get_task
from moerge.tasks.base import Sample

STREAM_SEED = 4242
STREAM_TEMPLATES = {
    "arith_sub": ["Take {b} away from {a} and give the number.", "{a} minus {b} equals what?",
                  "How much is {a} less {b}?", "Work out {a} minus {b}, digits only.",
                  "Tell me the result of subtracting {b} from {a}.", "Calculate {a} - {b}."],
    "max_of_list": ["Tell me the biggest number among {nums}.", "Out of {nums}, which number is largest?",
                    "Pick the maximum value from {nums}.", "Return the highest of these numbers: {nums}",
                    "What's the max of {nums}? Just the number.", "Largest value in {nums}?"],
    "lowercase": ["Make this all lower case: {s}", "Put this text in lowercase letters: {s}",
                  "Rewrite in lowercase only: {s}", "Turn the capitals into small letters: {s}",
                  "{s}\n\nWrite the line above in lower case.", "Change this to lowercase: {s}"],
    "date_us_to_iso": ["Rewrite {d} as YYYY-MM-DD.", "Give the ISO form of the date {d}.",
                       "{d} in year-month-day format, please.", "Turn the American date {d} into ISO format.",
                       "Format {d} as an ISO date.", "What is {d} written as YYYY-MM-DD?"],
}
DEFAULT_CHECK_TASKS = ("uppercase", "date_iso_to_us", "arith_add")   # held-in partners of held-out tasks


def _check_disjoint() -> None:
    for name, templates in STREAM_TEMPLATES.items():
        clash = {t.lower() for t in templates} & {t.lower() for t in get_task(name).eval_templates}
        if clash:
            raise ValueError(f"{name}: feedback-stream templates equal evaluation templates: {clash}")


def stream_samples(task_name: str, k: int, seed: int = STREAM_SEED) -> list[Sample]:
    """k prompts to learn from: training phrasings and training content only (module docstring)."""
    task = get_task(task_name)
    if task.held_in:
        return task.samples(k, seed, "train", "template")
    _check_disjoint()
    templates = STREAM_TEMPLATES[task_name]
    rng = random.Random(f"feedback-stream/{task_name}/{seed}")
    out = []
    for i in range(k):
        fields, answer, keys = task.make_content(rng, "train")
        t = (i + rng.randrange(len(templates))) % len(templates)
        out.append(Sample(task_name, templates[t].format(**fields), answer, t, "train", "content", tuple(keys)))
    return out


def _replay(ev: Evaluator, samples: list[Sample], plans: list[dict], experts: list[str]) -> list[dict[str, str]]:
    """Per sample, {arm: text}: every arm a correction replays (router/feedback.py, replay_arms), answered
    greedily in one engine call for the whole round (cached like every generation here)."""
    rows = [(k, a) for k, plan in enumerate(plans) for a in replay_arms(plan, experts)]
    recs = ev.generate([samples[k] for k, _ in rows], [arm_decision(a) for _, a in rows],
                       [replay_max_tokens(ev.tok, samples[k].answer) for k, _ in rows])
    out: list[dict[str, str]] = [{} for _ in samples]
    for (k, a), r in zip(rows, recs):
        out[k][a] = r["text"]
    return out


def _route_all(router, prompts: list[str]) -> list:
    with ThreadPoolExecutor(16) as pool:       # GLIDER instructions share the engine's batches
        return list(pool.map(router.route, prompts))


def feedback_curve(system, *, tasks: list[str], feedbacks: int = 20, every: int = 5, n: int = 25,
                   shift: str = "template", out: Path, cache_path: Path, namespace: str, explore_k: int = 3,
                   base: str = "glider-global", progress=print, router_options: dict | None = None,
                   kind: str = "score") -> dict:
    if kind not in ("score", "correction"):
        raise ValueError(f"feedback kind must be score or correction, not {kind!r}")
    out.mkdir(parents=True, exist_ok=True)
    cache = GenerationCache(cache_path, namespace)
    ev = Evaluator(system, cache)
    ctx = system.router_ctx
    store = store_for(system.pool.registry)
    opts = dict(base=base, explore_k=explore_k, **(router_options or {}))
    learner = FeedbackRouter(explore=True, **opts).fit(ctx)      # answers the stream, exploring
    measurer = FeedbackRouter(explore=False, **opts).fit(ctx)    # measures: posterior mean, no exploration
    experts = [c.name for c in system.pool.list() if c.kind == "lora"]
    t0 = time.time()
    streams = {t: stream_samples(t, feedbacks) for t in tasks}
    evals = {t: get_task(t).samples(n, EVAL_SEED, "eval", shift) for t in tasks}
    report = {"config": {"tasks": tasks, "feedbacks": feedbacks, "every": every, "n": n, "shift": shift,
                         "base": base, "explore_k": explore_k, "kind": kind, "eval_seed": EVAL_SEED,
                         "stream_seed": STREAM_SEED,
                         "router_options": opts},
              "tasks": {t: {"curve": [], "stream": []} for t in tasks}}

    def measure(step: int) -> None:
        for t in tasks:
            task, samples = get_task(t), evals[t]
            decisions = _route_all(measurer, [s.prompt for s in samples])
            recs = ev.generate(samples, decisions, [max_tokens_for(task, ev.tok, samples)] * len(samples))
            acc = sum(task.score(r["text"], s.answer) for r, s in zip(recs, samples)) / len(samples)
            report["tasks"][t]["curve"].append({"feedbacks": step, "accuracy": acc,
                                                "chosen_counts": _chosen_counts(decisions)})
            progress(f"[{time.time() - t0:6.0f}s] after {step:2d} feedbacks  {t:16s} accuracy {acc:.3f}  "
                     f"{_chosen_counts(decisions)}")
        (out / "feedback_curve.json").write_text(json.dumps(report, indent=2))

    measure(0)
    for i in range(feedbacks):
        samples = [streams[t][i] for t in tasks]
        decisions = _route_all(learner, [s.prompt for s in samples])
        recs = ev.generate(samples, decisions,
                           [max_tokens_for(get_task(s.task), ev.tok, [s]) for s in samples])
        plans, cids = [], []
        for s, d in zip(samples, decisions):
            cid = f"chatcmpl-eval-{uuid.uuid4().hex[:16]}"
            plans.append(plan_record(d, system.plan(d).kind))
            store.record_completion(cid, model="moerge:feedback", method=d.method, query=s.prompt, plan=plans[-1])
            cids.append(cid)
        replays = _replay(ev, samples, plans, experts) if kind == "correction" else None
        for k, (s, d, r, cid) in enumerate(zip(samples, decisions, recs, cids)):
            task = get_task(s.task)
            score = float(task.score(r["text"], s.answer))
            entry = {"i": i, "arm": d.chosen[0] if d.chosen else BASE_ARM, "score": score}
            if replays is None:
                store.add_feedback(cid, score=score, embed=ctx.embed, source="eval-stream")
            else:
                texts = replays[k]
                res = store.add_correction(cid, s.answer, lambda _q, arms: {a: texts[a] for a in arms},
                                           experts=experts, score=score, embed=ctx.embed, source="eval-stream")
                entry["right"] = res["right"]
            report["tasks"][s.task]["stream"].append(entry)
        if (i + 1) % every == 0 or i + 1 == feedbacks:
            measure(i + 1)
    held_out = [t for t in tasks if t in HELD_OUT]
    if held_out:
        from tqdm.auto import tqdm
        with tqdm(total=len(held_out), desc="best single", mininterval=5) as bar:
            best = ev.best_single(held_out, n, bar, shift)
        for t in held_out:
            report["tasks"][t]["best_single"] = best["tasks"][t]["accuracy"]
            report["tasks"][t]["best_single_expert"] = best["tasks"][t]["expert"]
            report["tasks"][t]["per_expert"] = best["tasks"][t]["per_expert"]
    aims = {}
    for t in held_out:
        entry = report["tasks"][t]
        final = entry["curve"][-1]["accuracy"]
        aims[t] = {"final": final, "best_single": entry["best_single"], "met": final >= entry["best_single"]}
    report["aim"] = {"per_task": aims, "met": bool(aims) and all(a["met"] for a in aims.values()),
                     "statement": f"after {feedbacks} feedbacks per task, held-out accuracy >= the best single "
                                  "expert on each held-out task"}
    report["cost"] = {"wall_seconds": round(time.time() - t0, 1), "cache_hits": cache.hits,
                      "cache_misses": cache.misses, "feedback_rows": store.count()}
    (out / "feedback_curve.json").write_text(json.dumps(report, indent=2))
    plot_curve(report, out / "feedback_curve.png")
    learner.close()
    measurer.close()
    cache.close()
    return report


def plot_curve(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["config"]["tasks"]
    cols = min(4, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        entry = report["tasks"][t]
        xs = [p["feedbacks"] for p in entry["curve"]]
        ax.plot(xs, [100 * p["accuracy"] for p in entry["curve"]], marker="o", label="feedback")
        if "best_single" in entry:
            ax.axhline(100 * entry["best_single"], color="tab:red", linestyle="--",
                       label=f"best single ({entry['best_single_expert']})")
        ax.set_title(f"{t} ({'held-out' if t in HELD_OUT else 'held-in'})")
        ax.set_xlabel("feedbacks on this task")
        ax.set_ylabel("accuracy, %")
        ax.set_ylim(-3, 103)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    cfg = report["config"]
    fig.suptitle(f"feedback router over {cfg['base']}, {cfg.get('kind', 'score')} feedback: n={cfg['n']} fresh "
                 f"evaluation prompts per task "
                 f"({cfg['shift']} shift), explore_k={cfg['explore_k']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
