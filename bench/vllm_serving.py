"""vLLM executor throughput with 1, 4 and 12 distinct adapters in a batch ÷ base-only, with
moerge's grouped punica wrapper and with vLLM's own, on vLLM's default cores and on all
cores (moerge's `vllm_cpu_threads`), and the service's added latency.

Each configuration is measured in the same engine (LoRA enabled, same compilation mode),
one batch of N concurrent requests × M forced new tokens; ratios are within one engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

console = Console(width=150)
N_PROMPTS, NEW_TOKENS = 48, 32


def _one_engine(punica: str, cores: str = "auto") -> dict:
    """Run in a child process so that MOERGE_VLLM_PUNICA reaches every vLLM process."""
    code = f"""
import json, sys, time, tempfile, asyncio
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from moerge.config import Settings
from moerge.assets import ensure_assets
from moerge.experts.pool import open_pool
from moerge.experts.bundled import load_bundled
from moerge.executors.vllm_engine import VllmExecutor
from moerge.models.generation import SamplingParams
from moerge.models.chat import encode_chat
from moerge.tasks import HELD_IN, get_task
if __name__ == "__main__":
    s = Settings(pool_dir=Path(tempfile.mkdtemp()), bundled_pool=True)
    a = ensure_assets(s)
    pool = open_pool(s)
    load_bundled(pool, progress=lambda m: None)
    names = sorted(pool.names())
    vx = VllmExecutor(a.base_model, pool, max_loras=12, max_num_seqs={N_PROMPTS}, max_lora_rank=16,
                      cpu_threads="{cores}")
    vx.wait_ready(900)
    tok = vx.tokenizer
    prompts = [s.prompt for t in HELD_IN for s in get_task(t).samples(4, 1, "eval")][:{N_PROMPTS}]
    ids = [encode_chat(tok, [{{"role": "user", "content": p}}]) for p in prompts]
    params = SamplingParams(max_tokens={NEW_TOKENS}, ignore_eos=True)
    def run(adapters):
        jobs = [(ids[i], adapters[i % len(adapters)] if adapters else None) for i in range(len(ids))]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(jobs)) as ex:
            outs = list(ex.map(lambda j: vx.generate_tokens(list(j[0]), params, j[1]), jobs))
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        return n / (time.perf_counter() - t0)
    run(names)            # warm-up: loads every adapter into the engine
    run(None)
    res = {{}}
    for label, adapters in [("base", None), ("1 adapter", names[:1]), ("4 adapters", names[:4]),
                            ("12 adapters", names[:12]), ("base (again)", None)]:
        res[label] = run(adapters)
    print("RESULT" + json.dumps(res), flush=True)
    vx.shutdown()
"""
    env = {**os.environ, "MOERGE_VLLM_PUNICA": punica}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3600)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    if not line:
        raise RuntimeError(f"vLLM bench ({punica}) failed:\n{proc.stderr[-3000:]}")
    import json
    return json.loads(line[-1][6:])


def run_throughput() -> dict:
    results = {f"{p}, {c} cores": _one_engine(p, c) for p, c in (("grouped", "auto"), ("vllm", "auto"),
                                                                  ("grouped", "all"))}
    table = Table("punica wrapper, cores", "base tok/s", "1 adapter ÷ base", "4 adapters ÷ base", "12 adapters ÷ base",
                  title=f"vLLM CPU, {N_PROMPTS} concurrent requests × {NEW_TOKENS} tokens, bf16, r=4 adapters")
    for p, r in results.items():
        base = (r["base"] + r["base (again)"]) / 2
        table.add_row(p, f"{base:.0f}", *(f"{r[k] / base:.2f}" for k in ("1 adapter", "4 adapters", "12 adapters")))
    console.print(table)
    return results


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
