"""`moerge eval`: every routing method side by side on held-in and held-out tasks, with bounds
(base, oracle, best single expert) and costs (routing latency, tokens/s, memory).

Every routing decision becomes an execution plan that names its engine (vLLM for all it runs);
every row carries its own plan, and routing never depends on the batch, so batching is only a
speed-up. Generations
are cached on disk by (library version, plan, prompt): an interrupted run resumes, and
methods that make the same plan for a prompt share one generation.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from moerge.eval.cache import GenerationCache
from moerge.eval.chain import generate_with_chains
from moerge.eval.verify import settle_checks
from moerge.models.generation import SamplingParams
from moerge.router.base import RoutingDecision, make_router
from moerge.router.calibrate import ood_split
from moerge.router.chain import is_chain
from moerge.tasks import COMPOSED, HELD_IN, HELD_OUT, get_task, out_of_domain_prompts

EVAL_SEED = 20261124
# bumped when an engine's output for the same plan changes (a fix), so cached generations are not reused
ENGINE_REVISION = {"reference": "@2"}   # @2: dense (TIES) plans on a fresh engine applied no update   # the same paraphrase samples the expert manifests report


@dataclass
class MethodSpec:
    label: str
    method: str
    options: dict = field(default_factory=dict)


def default_methods(quick: bool = False, alphas=(1.0, 3.0, 10.0, 30.0, 100.0)) -> list[MethodSpec]:
    specs = [MethodSpec(m, m) for m in ("base", "oracle", "merge-linear", "merge-ties", "merge-cat", "retrieval",
                                        "embed", "glider-global", "arrow", "phatgoose", "glider")]
    if not quick:
        # glider-global per step when a request asks for skills in sequence (router/chain.py), else glider-global
        specs.append(MethodSpec("chain", "chain"))
        # glider-global, with the chosen expert's answer checked: one that hands the request back is
        # replaced by the base model's (router/verify.py)
        specs.append(MethodSpec("verify", "verify"))
        # learns from feedback stored in the pool; a fresh evaluation pool has none, so this is its cold
        # start (= glider-global). `moerge eval --feedback-curve` streams feedback first (eval/feedback.py)
        specs.append(MethodSpec("feedback", "feedback", {"explore": False}))
        # the MoE base upcycled from the library, answering with its own router (eval/run.py builds it)
        specs.append(MethodSpec("moe", "moe"))
        # jointly trained gates, the request pooled per layer (eval/run.py trains the set, or reuses it)
        specs.append(MethodSpec("joint", "joint"))
        specs += [MethodSpec(f"glider α={a:g}", "glider", {"alpha": a}) for a in alphas]
    return specs


def max_tokens_for(task, tokenizer, samples) -> int:
    return max(8, max(len(tokenizer(s.answer)["input_ids"]) for s in samples) + 6)


class Evaluator:
    """Runs methods over tasks. Each routing decision becomes an execution plan
    (moerge.plan.make_plan), which names its engine: vLLM for every plan it runs, the reference
    engine for the rest (TIES) or for all with `--engine reference`. Every engine gets a task's
    rows in one call, plans mixed. The cache key is the engine plus the plan's signature, so a
    generation is only reused for the same computation on the same engine."""

    def __init__(self, system, cache: GenerationCache):
        self.system, self.cache = system, cache
        self.pool, self.ctx = system.pool, system.router_ctx
        self.tok = system.local[-1].tokenizer
        self.expert_of_task = {(c.extra or {}).get("task"): c.name for c in self.pool.list() if c.kind == "lora"}
        self.engine_rows: dict[str, int] = {}

    def generate(self, samples, decisions, max_tokens: list[int]) -> list[dict]:
        """One record per sample: text, tokens, seconds, layer_usage, engine (cached by engine + plan).
        All rows go to the engines in one call, so vLLM keeps its batch full across tasks."""
        out: list[dict | None] = [None] * len(samples)
        todo = []
        for i, (s, d) in enumerate(zip(samples, decisions)):
            plan = self.system.plan(d)
            # an engine whose model can change under the same plan (the MoE engine: its MoE base) salts the key
            salt = getattr(self.system.executor(plan), "cache_salt", "")
            key = self.cache.key(f"{plan.engine}{ENGINE_REVISION.get(plan.engine, '')}{salt}|{plan.signature()}",
                                 s.prompt, max_tokens[i])
            hit = self.cache.get(key)
            if hit is not None:
                out[i] = hit
            else:
                todo.append((i, key, plan))
        if todo:
            params = [SamplingParams(max_tokens=max_tokens[i], temperature=0.0) for i, _, _ in todo]
            prompts = [self.system.encode([{"role": "user", "content": samples[i].prompt}]) for i, _, _ in todo]
            t0 = time.perf_counter()
            gens = self.system.generate_many(prompts, params, [p for _, _, p in todo])
            share = (time.perf_counter() - t0) / len(todo)
            fresh = {}
            for (i, key, plan), g in zip(todo, gens):
                out[i] = fresh[key] = {"text": g.text, "tokens": g.completion_tokens, "seconds": share,
                                       "layer_usage": {str(k): v for k, v in g.layer_usage.items()},
                                       "engine": plan.engine}
                self.engine_rows[plan.engine] = self.engine_rows.get(plan.engine, 0) + 1
            self.cache.put_many(fresh)
        return out  # type: ignore[return-value]

    def run_method(self, spec: MethodSpec, tasks: list[str], n: int, bar, shift: str = "template") -> dict:
        router = make_router(spec.method, self.ctx, **spec.options)
        res = {"method": spec.method, "options": spec.options, "shift": shift, "tasks": {}, "routing": {}}
        lat, tokens, seconds = [], 0, 0.0
        engines: set[str] = set()
        rows = []          # (task, samples, decisions, max_tokens) per task
        for task_name in tasks:
            task = get_task(task_name)
            samples = task.samples(n, EVAL_SEED, "eval", shift)
            if _writes_instructions(router):
                # 16 routings at a time: the GLIDER instruction writer's generations share the engine's
                # batches (each one's latency then includes waiting for that batch)
                with ThreadPoolExecutor(16) as pool:
                    decisions = list(pool.map(lambda s: router.route(s.prompt, task=task_name), samples))
            else:
                decisions = [router.route(s.prompt, task=task_name) for s in samples]
            lat += [d.latency_ms for d in decisions]
            rows.append((task, samples, decisions, max_tokens_for(task, self.tok, samples)))
        # a `chain` decision runs its steps in order (eval/chain.py); every other decision is one generation
        recs_all = generate_with_chains(self, [s for _, ss, _, _ in rows for s in ss],
                                        [d for _, _, ds, _ in rows for d in ds], [m for _, ss, _, m in rows for _ in ss],
                                        router)
        # a `verify` decision's answer is checked, and a rejected one answered again by the base model
        recs_all = settle_checks(self, [s for _, ss, _, _ in rows for s in ss], [d for _, _, ds, _ in rows for d in ds],
                                 recs_all, [m for _, ss, _, m in rows for _ in ss])
        start = 0
        for task, samples, decisions, _ in rows:
            recs = recs_all[start:start + len(samples)]
            start += len(samples)
            correct = [task.score(r["text"], s.answer) for r, s in zip(recs, samples)]
            engines.update(r.get("engine", "reference") for r in recs)
            tokens += sum(r["tokens"] for r in recs)
            seconds += sum(r["seconds"] for r in recs)
            entry = {"accuracy": sum(correct) / len(correct), "n": len(correct),
                     "examples": [{"prompt": s.prompt, "expected": s.answer, "got": r["text"],
                                   "chosen": d.chosen[:3], **({"chain": r["chain"]} if "chain" in r else {})}
                                  for s, r, d in list(zip(samples, recs, decisions))[:3]]}
            right = self.expert_of_task.get(task.name)
            entry["chosen_counts"] = _chosen_counts(decisions)
            checks = [d.detail["verify"]["status"] for d in decisions if "verify" in (d.detail or {})]
            if checks:
                entry["verify"] = {k: checks.count(k) for k in sorted(set(checks))}
            if right and task.held_in:
                if router.granularity == "sequence":
                    entry["routing_top1"] = sum(bool(d.chosen) and d.chosen[0] == right for d in decisions) / len(decisions)
                elif router.granularity == "token":
                    entry["right_mass_per_layer"] = _right_mass(recs, right)
                    entry["routing_top1"] = statistics.mean(entry["right_mass_per_layer"].values()) \
                        if entry["right_mass_per_layer"] else 0.0
            res["tasks"][task.name] = entry
            bar.update(1)
        res["routing_latency_ms"] = {"mean": statistics.mean(lat), "p50": _pct(lat, 50), "p99": _pct(lat, 99)}
        res["tokens_per_second"] = tokens / seconds if seconds else None
        res["engines"] = sorted(engines)
        _summarise(res, tasks)
        return res

    def best_single(self, tasks: list[str], n: int, bar, shift: str = "template") -> dict:
        """Per held-out (and composed) task, the best accuracy any one expert gets (and which)."""
        from moerge.router.base import ExpertScore
        res = {"method": "best-single", "shift": shift, "tasks": {}}
        experts = [c.name for c in self.pool.list() if c.kind == "lora"]
        for task_name in [t for t in tasks if t in HELD_OUT or t in COMPOSED]:
            task = get_task(task_name)
            samples = task.samples(n, EVAL_SEED, "eval", shift)
            best = (-1.0, None)
            per_expert = {}
            pinned = [RoutingDecision("pinned", "sequence", experts=[ExpertScore(e, 1.0)], chosen=[e]) for e in experts]
            # every expert's rows in one call, so the fast engine batches mixed adapters together
            recs = self.generate([s for _ in experts for s in samples], [d for d in pinned for _ in samples],
                                 [max_tokens_for(task, self.tok, samples)] * (len(experts) * len(samples)))
            for k, e in enumerate(experts):
                mine = recs[k * len(samples):(k + 1) * len(samples)]
                acc = sum(task.score(r["text"], s.answer) for r, s in zip(mine, samples)) / len(samples)
                per_expert[e] = acc
                best = max(best, (acc, e), key=lambda x: x[0])
            res["tasks"][task_name] = {"accuracy": best[0], "expert": best[1], "per_expert": per_expert, "n": n}
            bar.update(1)
        _summarise(res, [t for t in tasks if t in HELD_OUT or t in COMPOSED])
        return res

    def out_of_domain(self, specs: list[MethodSpec]) -> dict:
        prompts = out_of_domain_prompts()
        held_back = ood_split(prompts, "evaluation")
        out = {}
        for spec in specs:
            router = make_router(spec.method, self.ctx, **spec.options)
            if spec.method in ("oracle",) or router.granularity in ("static", "none"):
                continue
            if _writes_instructions(router):     # instructions written 16 at a time, batched on the engine
                with ThreadPoolExecutor(16) as pool:
                    full = list(pool.map(lambda p: router.route(p).abstained, prompts))
            else:
                full = [router.route(p).abstained for p in prompts]
            unseen = [router.route(p).abstained for p in held_back]
            out[spec.label] = {"abstain_rate": sum(full) / len(full), "abstain_rate_unseen_half": sum(unseen) / len(unseen),
                               "n": len(full)}
        return out


def _writes_instructions(router) -> bool:
    return router.name in ("glider-global", "glider") or getattr(getattr(router, "base", None), "name", "") == "glider-global"


def _chosen_counts(decisions) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in decisions:
        if is_chain(d):         # a chain counts as its sequence of steps
            key = "→".join(s["expert"] or "(base)" for s in d.detail["chain"])
            counts[key] = counts.get(key, 0) + 1
            continue
        key = d.chosen[0] if d.chosen and d.granularity == "sequence" else ("(base)" if not d.chosen else "(mixture)")
        counts[key] = counts.get(key, 0) + 1
    return counts


def _right_mass(recs, right: str) -> dict[str, float]:
    per_layer: dict[str, list[float]] = {}
    for r in recs:
        for layer, shares in r.get("layer_usage", {}).items():
            per_layer.setdefault(layer, []).append(shares.get(right, 0.0))
    return {k: statistics.mean(v) for k, v in sorted(per_layer.items(), key=lambda kv: int(kv[0]))}


def _pct(xs, q):
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def _summarise(res: dict, tasks: list[str]) -> None:
    accs = {t: v["accuracy"] for t, v in res["tasks"].items()}
    hi = [accs[t] for t in tasks if t in HELD_IN and t in accs]
    ho = [accs[t] for t in tasks if t in HELD_OUT and t in accs]
    res["held_in"] = statistics.mean(hi) if hi else None
    res["held_out"] = statistics.mean(ho) if ho else None
    co = [accs[t] for t in tasks if t in COMPOSED and t in accs]
    res["composed"] = statistics.mean(co) if co else None
    top1 = [v["routing_top1"] for v in res["tasks"].values() if "routing_top1" in v]
    res["routing_top1_held_in"] = statistics.mean(top1) if top1 else None


def evaluate(system, *, methods: list[MethodSpec], tasks: list[str], n: int, out: Path,
             cache_path: Path, namespace: str, with_best_single: bool = True,
             shifts: tuple[str, ...] = ("template", "content")) -> dict:
    """Every method on every task, once per evaluation shift (tasks/base.py: `template` = unseen
    phrasings of the template lists' content; `content` = unseen phrasings of content from the
    evaluation pools, which training never draws from). `report["shifts"][shift]["methods"]`
    holds each shift's results; `report["methods"]` is the first shift's, for readers of one."""
    out.mkdir(parents=True, exist_ok=True)
    cache = GenerationCache(cache_path, namespace)
    ev = Evaluator(system, cache)
    pool = system.pool
    t0 = time.time()
    held_out = len([t for t in tasks if t in HELD_OUT or t in COMPOSED]) if with_best_single else 0
    steps = (len(methods) * len(tasks) + held_out) * len(shifts)
    report = {"config": {"n": n, "tasks": tasks, "methods": [m.label for m in methods], "eval_seed": EVAL_SEED,
                         "shifts": list(shifts), "experts": [c.name for c in pool.list()]}, "shifts": {}}
    with tqdm(total=steps, desc="eval", mininterval=2) as bar:
        for shift in shifts:
            mine = report["shifts"].setdefault(shift, {"methods": {}})["methods"]
            report.setdefault("methods", mine)
            for spec in methods:
                bar.set_postfix_str(f"{shift}: {spec.label}")
                mine[spec.label] = ev.run_method(spec, tasks, n, bar, shift)
                (out / "report.json").write_text(json.dumps(report, indent=2))
            if with_best_single:
                mine["best-single"] = ev.best_single(tasks, n, bar, shift)
    report["out_of_domain"] = ev.out_of_domain(methods)
    report["cost"] = {"wall_seconds": round(time.time() - t0, 1), "cache_hits": cache.hits,
                      "cache_misses": cache.misses, "generations_by_engine": dict(ev.engine_rows),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    from moerge.eval.report import write_report
    write_report(report, out)
    cache.close()
    return report
