"""Score any OpenAI-compatible endpoint on the task suite (moerge over HTTP, or another router)."""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from moerge.eval.harness import EVAL_SEED, _summarise
from moerge.tasks import get_task


def evaluate_endpoint(url: str, model: str, tasks: list[str], n: int, out: Path, api_key: str = "none",
                      concurrency: int = 4, max_tokens: int = 48,
                      shifts: tuple[str, ...] = ("template", "content")) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=api_key, max_retries=1, timeout=300)

    def ask(prompt: str) -> tuple[str, dict | None, float]:
        t0 = time.perf_counter()
        r = client.chat.completions.create(model=model, temperature=0, max_tokens=max_tokens,
                                           messages=[{"role": "user", "content": prompt}])
        extra = (r.model_extra or {}).get("moerge")
        return r.choices[0].message.content or "", extra, time.perf_counter() - t0

    def score(shift: str) -> dict:
        res = {"method": f"endpoint:{model}", "endpoint": url, "shift": shift, "tasks": {}}
        latencies = []
        with ThreadPoolExecutor(concurrency) as pool, tqdm(total=len(tasks) * n, desc=f"eval {model} ({shift})") as bar:
            for task_name in tasks:
                task = get_task(task_name)
                samples = task.samples(n, EVAL_SEED, "eval", shift)
                answers = []
                for got in pool.map(lambda s: ask(s.prompt), samples):
                    answers.append(got)
                    bar.update(1)
                correct = [task.score(a[0], s.answer) for a, s in zip(answers, samples)]
                entry = {"accuracy": sum(correct) / len(correct), "n": len(correct)}
                chosen = [(a[1] or {}).get("chosen") or [] for a in answers]
                if any(a[1] for a in answers) and task.held_in:
                    entry["routing_top1"] = sum(bool(c) and c[0] == task_name for c in chosen) / len(chosen)
                latencies += [a[2] for a in answers]
                res["tasks"][task_name] = entry
        res["request_latency_s"] = {"mean": statistics.mean(latencies), "max": max(latencies)}
        _summarise(res, tasks)
        return res

    report = {"config": {"n": n, "tasks": tasks, "endpoint": url, "model": model, "eval_seed": EVAL_SEED,
                         "shifts": list(shifts)}, "shifts": {}}
    for shift in shifts:
        res = score(shift)
        report["shifts"][shift] = {"methods": {res["method"]: res}}
        report.setdefault("methods", report["shifts"][shift]["methods"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    from moerge.eval.report import write_report
    write_report(report, out)
    return report

