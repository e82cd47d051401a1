"""Throughput through the HTTP service ÷ the vLLM engine called directly, at 48 and 96 concurrent
requests of 16 forced new tokens on the base model, in one engine, on loopback.

python -m bench.service_vs_engine [--concurrency 48 96] [--tokens 16] [--rounds 2]

A child process starts the engine, times the direct calls (all requests submitted at once on the
engine loop), then serves the app with uvicorn on 127.0.0.1; this process sends the same requests
over HTTP at the same concurrency. The child's whole process group (EngineCore included) is ended.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]

CHILD = """
import json, sys, tempfile, time
from pathlib import Path
import uvicorn
from moerge.config import Settings
from moerge.models.generation import SamplingParams
from moerge.service.app import create_app
from moerge.service.runtime import Runtime
from moerge.startup import start
if __name__ == "__main__":
    port, tokens, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    conc = [int(c) for c in sys.argv[4:]]
    system = start(Settings(bundled_pool=False), executor="vllm", pool_dir=Path(tempfile.mkdtemp()),
                   with_router=False, progress=lambda m: None)
    vx = system.local[0]
    vx.wait_ready(900)
    ids = system.encode(%r)
    sp = SamplingParams(max_tokens=tokens, ignore_eos=True)
    base = system.plan(None)
    vx.generate_many([ids] * 4, sp, [base] * 4)     # warm-up
    direct = {}
    for n in conc:
        rates = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            gens = vx.generate_many([ids] * n, sp, [base] * n)
            rates.append(sum(g.completion_tokens for g in gens) / (time.perf_counter() - t0))
        direct[n] = rates
    print("\\n" + json.dumps(direct), flush=True)
    try:
        uvicorn.run(create_app(Runtime(system)), host="127.0.0.1", port=port, log_level="warning")
    finally:
        system.shutdown()
""" % (PROMPT,)


async def _through_service(url: str, n: int, tokens: int) -> float:
    body = {"model": "base", "messages": PROMPT, "max_tokens": tokens, "ignore_eos": True}
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        t0 = time.perf_counter()
        answers = await asyncio.gather(*[client.post("/v1/chat/completions", json=body) for _ in range(n)])
        elapsed = time.perf_counter() - t0
    bad = [a.status_code for a in answers if a.status_code != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} of {n} requests failed: {bad[:5]}")
    return sum(a.json()["usage"]["completion_tokens"] for a in answers) / elapsed


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, nargs="+", default=[48, 96])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args(argv)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(args.port), str(args.tokens), str(args.rounds),
                              *map(str, args.concurrency)], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        line = ""
        while not line.startswith("{"):        # vLLM logs to stdout too
            line = child.stdout.readline()
            if not line:
                raise RuntimeError("the engine process ended before its direct figures")
        direct = {int(k): v for k, v in json.loads(line).items()}
        url = f"http://127.0.0.1:{args.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        asyncio.run(_through_service(url, 4, args.tokens))       # warm-up
        service = {n: [asyncio.run(_through_service(url, n, args.tokens)) for _ in range(args.rounds)]
                   for n in args.concurrency}
    finally:
        os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
    result = {"tokens": args.tokens, "rounds": args.rounds, "cpu_count": os.cpu_count(), "rows": []}
    for n in args.concurrency:
        d, s = max(direct[n]), max(service[n])
        result["rows"].append({"concurrent": n, "engine_tok_s": direct[n], "service_tok_s": service[n],
                               "ratio_best": s / d})
        print(f"{n:>4} concurrent: engine {d:7.1f} tok/s, service {s:7.1f} tok/s, service ÷ engine {s / d:.2f}")
    out = Path("runs/bench/service_vs_engine.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
