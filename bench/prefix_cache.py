"""vLLM prefix caching on the routing hot path: glider-global's instruction writer, with the engine's
prefix cache off and on, side by side.

Every glider-global routing of an uncached query runs the base model on the writer's prompt: a fixed
system message and seven few-shot pairs, then the query. With prefix caching the engine reuses the
fixed part's KV blocks (128 tokens each on CPU) and prefills only the rest.

Two engines run in this process, one with `vllm_prefix_caching` off and one with it on, each with its
own writer cache (so every query below is uncached on both). Each round routes a fresh set of
development prompts (held-in tasks' training phrasings over the training content pool, and
out-of-domain prompts) with `concurrency` routings at once, on each engine in turn; which engine goes
first alternates, so competing load hits both alike. Printed: routing latency p50 / p90 per engine
and their ratio, the share of prompt tokens the engine took from its cache (one batch of writer
prompts through the executor), and how many instructions the two engines wrote alike.

python -m bench.prefix_cache [--rounds 6] [--concurrency 16 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moerge.config import Settings
from moerge.models.generation import SamplingParams
from moerge.router.base import make_router
from moerge.startup import start
from moerge.tasks import HELD_IN, get_task, out_of_domain_prompts


class Side:
    def __init__(self, caching: bool):
        self.caching = caching
        self.system = start(Settings(vllm_prefix_caching=caching), executor="vllm", bundled=True,
                            pool_dir=Path(tempfile.mkdtemp(prefix="moerge-bench-prefix-")), progress=lambda m: None)
        self.ex = self.system.local[0]
        assert self.ex.wait_ready(900), "vLLM did not start"
        self.router = make_router("glider-global", self.system.router_ctx)
        self.latency: dict[int, list[float]] = {}
        self.instructions: dict[str, str] = {}

    def route_all(self, prompts: list[str], concurrency: int) -> None:
        def one(q):
            t0 = time.perf_counter()
            d = self.router.route(q)
            self.latency.setdefault(concurrency, []).append(time.perf_counter() - t0)
            self.instructions[q] = d.instruction
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, prompts))

    def cached_share(self, prompts: list[str]) -> float:
        w = self.system.router_ctx.instruction_writer
        ids = [self.system.encode(w._messages(q)) for q in prompts]
        gens = self.ex.generate_many(ids, SamplingParams(max_tokens=w.max_new_tokens, stop=["\n"]),
                                     [self.system.plan(None)] * len(ids))
        return sum(g.cached_tokens for g in gens) / sum(g.prompt_tokens for g in gens)


def dev_prompts(n: int) -> list[str]:
    """Distinct development prompts: training phrasings and training content, then out-of-domain ones."""
    out, seen, seed = [], set(), 900
    ood = out_of_domain_prompts()
    while len(out) < n:
        for t in HELD_IN:
            for shift in ("template", "content"):
                for s in get_task(t).samples(1, seed, "train", shift):
                    if s.prompt not in seen:
                        seen.add(s.prompt)
                        out.append(s.prompt)
        q = ood[seed % len(ood)]
        if q not in seen:
            seen.add(q)
            out.append(q)
        seed += 1
    return out[:n]


def run(rounds: int = 6, concurrency: tuple[int, ...] = (16, 1)) -> dict:
    sides = []
    for caching in (False, True):
        print(f"starting the engine with prefix caching {'on' if caching else 'off'}", flush=True)
        sides.append(Side(caching))
    per_round = {c: max(c, 4) for c in concurrency}
    need = sum(per_round[c] * rounds for c in concurrency) + 16 + 16
    prompts = dev_prompts(need)
    warm, share_set, prompts = prompts[:16], prompts[16:32], prompts[32:]
    for s in sides:                          # warm-up: first batches compile kernels
        s.route_all(warm, 16)
        s.latency.clear()
    i, r = 0, 0
    for c in concurrency:
        for k in range(rounds):
            batch = prompts[i:i + per_round[c]]
            i += per_round[c]
            for s in (sides if r % 2 == 0 else sides[::-1]):
                s.route_all(batch, c)
            r += 1
            print(f"  concurrency {c}: round {k + 1}/{rounds} done", flush=True)
    result = {"rounds": rounds, "concurrency": {}}
    for c in concurrency:
        row = {}
        for s in sides:
            lat = sorted(s.latency[c])
            row["on" if s.caching else "off"] = {
                "n": len(lat), "p50_ms": round(1000 * statistics.median(lat), 1),
                "p90_ms": round(1000 * lat[int(0.9 * (len(lat) - 1))], 1)}
        row["p50_ratio_on_off"] = round(row["on"]["p50_ms"] / row["off"]["p50_ms"], 3)
        result["concurrency"][c] = row
    result["cached_prompt_share"] = {("on" if s.caching else "off"): round(s.cached_share(share_set), 3) for s in sides}
    same = [q for q in sides[0].instructions if sides[0].instructions[q] == sides[1].instructions.get(q)]
    result["instructions_alike"] = f"{len(same)} of {len(sides[0].instructions)}"
    print("\n| concurrency | caching | routings | p50 ms | p90 ms |\n|---|---|---|---|---|")
    for c, row in result["concurrency"].items():
        for k in ("off", "on"):
            print(f"| {c} | {k} | {row[k]['n']} | {row[k]['p50_ms']} | {row[k]['p90_ms']} |")
    for c, row in result["concurrency"].items():
        print(f"routing p50 with prefix caching / without, {c} at a time: {row['p50_ratio_on_off']}")
    print(f"prompt tokens taken from the prefix cache (16 writer prompts after the rounds): "
          f"{result['cached_prompt_share']}")
    print(f"instructions the two engines wrote alike: {result['instructions_alike']}")
    for s in sides:
        s.system.shutdown()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 1])
    ap.add_argument("--out", default="runs/bench/prefix_cache.json")
    args = ap.parse_args()
    result = run(args.rounds, tuple(args.concurrency))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
