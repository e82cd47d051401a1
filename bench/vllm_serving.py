"""vLLM executor throughput per plan mix ÷ base-only (1, 4, 12 distinct adapters; token-level
arrow/phatgoose/glider top-2 of 12; a mixed batch), the same token-level plans on the reference
engine, and the service's added latency.

Each configuration is measured in the same engine (LoRA enabled, same compilation mode), one
batch of N concurrent requests × M forced new tokens; ratios are within one engine and one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

console = Console(width=150)
N_PROMPTS, NEW_TOKENS = 48, 32


def _one_engine(cores: str = "all", reference: bool = True) -> dict:
    """Run in a child process (vLLM's engine needs a __main__ guard; env reaches every vLLM process)."""
    code = f"""
import json, time, tempfile
from dataclasses import replace
from pathlib import Path
from moerge.config import Settings
from moerge.startup import start
from moerge.models.generation import SamplingParams
from moerge.router.base import ExpertScore, RoutingDecision, make_router
from moerge.tasks import HELD_IN, get_task
if __name__ == "__main__":
    s = Settings(bundled_pool=True)
    system = start(s, executor="vllm", pool_dir=Path(tempfile.mkdtemp()),
                   vllm_options=dict(cpu_threads="{cores}", max_num_seqs=64), progress=lambda m: None)
    vx, ref = system.local
    vx.wait_ready(900)
    names = sorted(system.pool.names())
    prompts = [x.prompt for t in HELD_IN for x in get_task(t).samples(4, 1, "eval")][:{N_PROMPTS}]
    ids = [system.encode([{{"role": "user", "content": p}}]) for p in prompts]
    params = SamplingParams(max_tokens={NEW_TOKENS}, ignore_eos=True)
    pinned = lambda n: system.plan(RoutingDecision("pinned", "sequence", [ExpertScore(n, 1.0)], [n]))
    base = system.plan(None)
    routers = {{m: make_router(m, system.router_ctx) for m in ("arrow", "phatgoose", "glider")}}
    token = {{m: [system.plan(r.route(p)) for p in prompts] for m, r in routers.items()}}
    def mixed():
        out = []
        for i in range(len(prompts)):
            out.append(base if i % 3 == 0 else pinned(names[i % len(names)]) if i % 3 == 1 else token["arrow"][i])
        return out
    configs = [("base", [base] * len(ids)), ("1 adapter", [pinned(names[0])] * len(ids)),
               ("4 adapters", [pinned(names[i % 4]) for i in range(len(ids))]),
               ("12 adapters", [pinned(names[i % 12]) for i in range(len(ids))]),
               *[(f"{{m}} top-2 of 12", token[m]) for m in token], ("mixed", mixed()), ("base (again)", [base] * len(ids))]
    def run(plans, executor=vx, n=None):
        n = n or len(ids)
        t0 = time.perf_counter()
        gens = executor.generate_many(ids[:n], params, plans[:n])
        return sum(g.completion_tokens for g in gens) / (time.perf_counter() - t0)
    run(configs[3][1]); run(token["glider"]); run([base] * len(ids))     # warm-up: experts resident
    res = {{label: run(plans) for label, plans in configs}}
    if {reference}:
        # the reference engine on the same token-level plans (16 prompts: it is slow)
        for m in ("arrow",):
            run([replace(p, engine="reference") for p in token[m]], ref, 16)
            res[f"{{m}} reference"] = run([replace(p, engine="reference") for p in token[m]], ref, 16)
            res[f"{{m}} vllm 16"] = run(token[m], vx, 16)
    # glider-global routing, uncached, 16 concurrent: the instruction writer batches on the same engine
    from concurrent.futures import ThreadPoolExecutor
    gg = make_router("glider-global", system.router_ctx)
    queries = [x.prompt for t in HELD_IN for x in get_task(t).samples(2, 77, "eval")][:16]
    system.router_ctx.instruction_writer.clear()
    with ThreadPoolExecutor(16) as pool:
        lat = list(pool.map(lambda q: gg.route(q).latency_ms, queries))
    system.router_ctx.instruction_writer.clear()
    seq = [gg.route(q).latency_ms for q in queries[:4]]
    lat.sort()
    res["glider_global_uncached_16"] = {{"p50": lat[len(lat) // 2], "p99": lat[-1], "alone_p50": sorted(seq)[2]}}
    print("RESULT" + json.dumps(res), flush=True)
    system.shutdown()
"""
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True,
                          timeout=3600)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    if not line:
        raise RuntimeError(f"vLLM bench failed:\n{proc.stderr[-3000:]}")
    import json
    return json.loads(line[-1][6:])


def run_throughput() -> dict:
    r = _one_engine("all")
    print("RAW " + json.dumps(r), flush=True)
    base = (r["base"] + r["base (again)"]) / 2
    table = Table("plan mix (every request its own plan)", "tok/s", "÷ base-only",
                  title=f"vLLM CPU with the moerge plugin, {N_PROMPTS} concurrent requests × {NEW_TOKENS} tokens, "
                        "bf16, r=4 experts, all cores")
    for k, v in r.items():
        if k in ("base (again)",) or k.endswith("reference") or k.endswith("vllm 16") or not isinstance(v, float):
            continue
        table.add_row(k, f"{v:.0f}", f"{v / base:.2f}")
    console.print(table)
    if "arrow reference" in r:
        console.print(f"arrow top-2 of 12, 16 prompts × {NEW_TOKENS} tokens: vLLM {r['arrow vllm 16']:.0f} tok/s (bf16) "
                      f"vs reference engine {r['arrow reference']:.0f} tok/s (fp32): "
                      f"{r['arrow vllm 16'] / r['arrow reference']:.1f}×")
    g = r.get("glider_global_uncached_16")
    if g:
        console.print(f"glider-global routing, uncached, 16 concurrent (instruction written on the vLLM engine): "
                      f"p50 {g['p50']:.0f} ms, p99 {g['p99']:.0f} ms; one at a time p50 {g['alone_p50']:.0f} ms")
    r["base_mean"] = base
    return r


def run_service_latency(n: int = 40) -> dict:
    """p50/p99 of one request through the HTTP service minus the same request on the engine directly."""
    import socket
    import tempfile
    import threading
    from pathlib import Path

    import httpx
    import numpy as np
    import uvicorn

    from moerge.config import Settings
    from moerge.models.generation import SamplingParams
    from moerge.service.app import create_app
    from moerge.service.factory import build_runtime

    s = Settings(pool_dir=Path(tempfile.mkdtemp()), bundled_pool=True, executor="vllm")
    runtime = build_runtime(s, progress=lambda m: None)
    runtime.executor.wait_ready(900)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    msgs = [{"role": "user", "content": "What is 12 + 30? Answer with the number only."}]
    direct, http = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        runtime.executor.generate(msgs, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                                  runtime.plan("arith_add", msgs))
        direct.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                       json={"model": "arith_add", "messages": msgs, "max_tokens": 8, "temperature": 0,
                             "ignore_eos": True})
        assert r.status_code == 200
        http.append(time.perf_counter() - t0)
    server.should_exit = True
    runtime.executor.shutdown()
    d, h = np.array(direct) * 1000, np.array(http) * 1000
    out = {"direct_p50_ms": float(np.percentile(d, 50)), "direct_p99_ms": float(np.percentile(d, 99)),
           "service_p50_ms": float(np.percentile(h, 50)), "service_p99_ms": float(np.percentile(h, 99))}
    out["added_p50_ms"] = out["service_p50_ms"] - out["direct_p50_ms"]
    out["added_p99_ms"] = out["service_p99_ms"] - out["direct_p99_ms"]
    table = Table("", "p50 ms", "p99 ms", title=f"one request, 8 new tokens, {n} runs (service: model=arith_add)")
    table.add_row("engine directly", f"{out['direct_p50_ms']:.1f}", f"{out['direct_p99_ms']:.1f}")
    table.add_row("through the service", f"{out['service_p50_ms']:.1f}", f"{out['service_p99_ms']:.1f}")
    table.add_row("added by the service", f"{out['added_p50_ms']:.1f}", f"{out['added_p99_ms']:.1f}")
    console.print(table)
    return out
