"""Routed generation throughput and routing latency on the bundled library, side by side."""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from moerge.config import Settings
from moerge.models.generation import SamplingParams
from moerge.router.base import RoutingDecision, make_router
from moerge.tasks import HELD_IN, get_task, out_of_domain_prompts

console = Console(width=150)


@dataclass
class Env:
    system: object
    engine: object      # the reference engine (RoutedEngine)
    ctx: object

    @classmethod
    def build(cls) -> "Env":
        from moerge.startup import start
        system = start(Settings(bundled_pool=True), executor="reference",
                       pool_dir=Path(tempfile.mkdtemp(prefix="moerge-bench-")), progress=lambda m: None)
        return cls(system, system.local[0].engine, system.router_ctx)

    def row(self, decision):
        return self.engine.row_plan(self.system.plan(decision))


def _throughput(engine, prompts, plans, params, batch: int) -> float:
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(prompts), batch):
        res = engine.generate_batch(prompts[i:i + batch], plans[i:i + batch], params)
        n += sum(len(r.tokens) for r in res)
    return n / (time.perf_counter() - t0)


def run_generation(env: Env, n_prompts: int = 8, max_tokens: int = 32) -> dict:
    names = env.system.pool.names()
    if not names:
        raise SystemExit("no experts in the bundled library: run `moerge experts build` first")
    samples = [s for t in HELD_IN for s in get_task(t).samples(1, 5, "eval")][:n_prompts]
    prompts = [env.engine.encode_chat([{"role": "user", "content": s.prompt}]) for s in samples]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    modes = {"base": lambda s: env.row(None),
             "single adapter": lambda s: env.row(RoutingDecision("pinned", "sequence",
                                                                 chosen=[s.task if s.task in names else names[0]]))}
    arrow = make_router("arrow", env.ctx, top_k=2)
    modes[f"arrow top-2 of {len(names)}"] = lambda s: env.row(arrow.route(s.prompt))
    ph = make_router("phatgoose", env.ctx, top_k=2)
    if ph.eligible():
        modes[f"phatgoose top-2 of {len(ph.eligible())}"] = lambda s: env.row(ph.route(s.prompt))
    table = Table("plan", "batch", "tokens/s", "÷ single adapter", "÷ base",
                  title=f"reference engine, {n_prompts} prompts × {max_tokens} new tokens")
    out = {}
    for batch in (1, 8):
        tps = {}
        for label, make in modes.items():
            plans = [make(s) for s in samples]
            _throughput(env.engine, prompts[:1], plans[:1], SamplingParams(max_tokens=2, ignore_eos=True), 1)
            tps[label] = _throughput(env.engine, prompts, plans, params, batch)
        for label, v in tps.items():
            table.add_row(label, str(batch), f"{v:.1f}", f"{v / tps['single adapter']:.2f}", f"{v / tps['base']:.2f}")
        out[f"batch{batch}"] = tps
    console.print(table)
    return out


def _pct(xs, q):
    return float(np.percentile(np.array(xs), q))


def run_latency(env: Env) -> dict:
    queries = [s.prompt for t in HELD_IN for s in get_task(t).samples(4, 11, "eval")] + out_of_domain_prompts()[:22]
    table = Table("method", "n", "p50 ms", "p99 ms", "mean ms", title="routing latency per request")
    out = {}
    embed = make_router("embed", env.ctx)
    lat = [embed.route(q).latency_ms for q in queries]
    out["embed"] = lat
    glider = make_router("glider-global", env.ctx)
    env.ctx.instruction_writer.clear()
    sub = queries[:30]
    out["glider-global uncached"] = [glider.route(q).latency_ms for q in sub]
    out["glider-global cached"] = [glider.route(q).latency_ms for q in sub]
    for k, v in out.items():
        table.add_row(k, str(len(v)), f"{_pct(v, 50):.1f}", f"{_pct(v, 99):.1f}", f"{statistics.mean(v):.1f}")
    console.print(table)
    return {k: {"p50": _pct(v, 50), "p99": _pct(v, 99), "n": len(v)} for k, v in out.items()}
