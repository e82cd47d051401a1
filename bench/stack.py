"""The native stack (scripts/stack.sh) measured side by side in one run:
- throughput through the balancer (nginx, 2 replicas) ÷ 1 replica called directly, on the same engines:
  completion tokens per second at the same concurrency, rounds alternating direct / balancer;
- how long until a registration on one replica is routed by the other: p50 / p99 / max over rounds,
  timed from replica A's 201 to the first `moerge:embed` routing on B that chooses the new expert.

python -m bench.stack [--dir DIR] [--concurrency 16] [--tokens 16] [--seconds 20] [--rounds 2] [--visibility 20]

Without --dir it starts a stack in a temporary folder and stops it at the end (its start time is printed);
with --dir it uses the stack running there. Prints JSON and saves it to runs/bench/stack.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
STACK = ROOT / "scripts" / "stack.sh"
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
CARD = "Translates English sentences into pirate speak, arr."


def read_env(folder: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (folder / "stack.env").read_text().splitlines() if "=" in line)


async def tokens_per_second(url: str, concurrency: int, tokens: int, seconds: float) -> dict:
    """Clients that each send chat requests back to back for `seconds`; completion tokens/s and errors."""
    done, errors = [], 0
    body = {"model": "base", "messages": PROMPT, "max_tokens": tokens, "ignore_eos": True, "temperature": 0}
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        t0 = time.perf_counter()

        async def worker():
            nonlocal errors
            while time.perf_counter() - t0 < seconds:
                r = await client.post(f"{url}/v1/chat/completions", json=body)
                if r.status_code == 200:
                    done.append(r.json()["usage"]["completion_tokens"])
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        took = time.perf_counter() - t0
    return {"tokens_per_s": sum(done) / took, "requests": len(done), "errors": errors, "seconds": took}


def throughput(env: dict, concurrency: int, tokens: int, seconds: float, rounds: int) -> dict:
    direct, balanced = [], []
    asyncio.run(tokens_per_second(env["REPLICA_A_URL"], concurrency, tokens, 3))     # warm-up
    for _ in range(rounds):
        direct.append(asyncio.run(tokens_per_second(env["REPLICA_A_URL"], concurrency, tokens, seconds)))
        balanced.append(asyncio.run(tokens_per_second(env["BALANCER_URL"], concurrency, tokens, seconds)))
    ratios = [b["tokens_per_s"] / d["tokens_per_s"] for d, b in zip(direct, balanced)]
    return {"concurrency": concurrency, "tokens": tokens, "seconds": seconds, "direct_replica_a": direct,
            "balancer_2_replicas": balanced, "ratio_per_round": ratios, "ratio_mean": statistics.mean(ratios)}


def visibility(env: dict, rounds: int, adapter: Path) -> dict:
    a, b = env["REPLICA_A_URL"], env["REPLICA_B_URL"]
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(adapter.iterdir())]
    route = {"model": "moerge:embed", "messages": [{"role": "user", "content": "Say this like a pirate would: hi"}]}
    delays, poll_s = [], float(env["POOL_POLL_S"])
    with httpx.Client(timeout=120) as http:
        for i in range(rounds):
            name = f"bench-pirate-{i}"
            r = http.post(f"{a}/v1/experts", data={"name": name, "description": CARD}, files=files)
            r.raise_for_status()
            t0 = time.perf_counter()
            while http.post(f"{b}/v1/route", json=route).json()["chosen"] != [name]:
                if time.perf_counter() - t0 > 30:
                    raise RuntimeError(f"replica B did not route to {name} within 30 s")
                time.sleep(0.01)
            delays.append(time.perf_counter() - t0)
            http.delete(f"{a}/v1/experts/{name}").raise_for_status()
            # B drops it before the next round; a random pause, so rounds do not start in step with B's poll
            time.sleep(0.5 + random.uniform(0, poll_s))
    q = statistics.quantiles(delays, n=100, method="inclusive")
    return {"rounds": rounds, "p50_ms": 1000 * statistics.median(delays), "p99_ms": 1000 * q[98],
            "max_ms": 1000 * max(delays), "poll_s": poll_s}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, help="a stack already running in this folder")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--visibility", type=int, default=20, help="registration rounds (0: skip)")
    args = ap.parse_args(argv)

    folder, started_here = args.dir, args.dir is None
    result: dict = {}
    if started_here:
        folder = Path(tempfile.mkdtemp(prefix="moerge-bench-stack-"))
        t0 = time.perf_counter()
        subprocess.run(["bash", str(STACK), "start", str(folder)], check=True,
                       env={**os.environ, "MOERGE_BUNDLED_POOL": "false"})
        result["stack_start_s"] = time.perf_counter() - t0
    try:
        env = read_env(folder)
        result["executor"] = env["STACK_EXECUTOR"]
        result["throughput"] = throughput(env, args.concurrency, args.tokens, args.seconds, args.rounds)
        if args.visibility:
            from moerge.config import get_settings
            from tests.helpers import make_lora
            adapter = make_lora(get_settings().base_model_dir, Path(tempfile.mkdtemp()) / "pirate",
                                base_name=BASE_ID, scale_b=0.02)
            result["visibility"] = visibility(env, args.visibility, adapter)
    finally:
        if started_here:
            subprocess.run(["bash", str(STACK), "stop", str(folder)], check=False)
            shutil.rmtree(folder, ignore_errors=True)
    out = ROOT / "runs" / "bench" / "stack.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    t = result["throughput"]
    print(f"balancer (2 replicas) ÷ replica A direct: {t['ratio_mean']:.2f} (rounds: "
          f"{', '.join(f'{r:.2f}' for r in t['ratio_per_round'])})", file=sys.stderr)
    if "visibility" in result:
        v = result["visibility"]
        print(f"registration visible on the other replica: p50 {v['p50_ms']:.0f} ms, p99 {v['p99_ms']:.0f} ms, "
              f"max {v['max_ms']:.0f} ms over {v['rounds']}", file=sys.stderr)


if __name__ == "__main__":
    main()
