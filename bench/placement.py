"""Requests/s with adapter placement across 2 vLLM servers ÷ 1 server holding all the adapters.

python -m bench.placement [--requests 120] [--concurrency 8] [--tokens 16] [--adapters 5] [--punica moerge|vllm]

Both set-ups run in this one invocation, one after the other, on the same machine, with the same
adapters (the first `--adapters` bundled experts) and the same request mix (a seeded random
sequence of pinned requests, `--tokens` forced new tokens each, greedy), sent by `--concurrency`
closed-loop clients through the servers executor (moerge/executors/vllm_servers.py):
- two: 2 servers, each `--max-loras 2` and pinned to one core (cores 0 and 1): 4 slots for 5
  adapters, so placement both spreads adapters and evicts (LRU);
- one: 1 server, `--max-loras` = the number of adapters, both cores (0-1): it holds them all.
The same total cores either way. Servers run bfloat16 (the default), start cold, get one warm-up
request per adapter that is not counted. JSON in runs/bench/placement.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

from moerge.config import Settings
from moerge.executors.engine_server import EngineServer
from moerge.models.generation import SamplingParams
from moerge.router.base import ExpertScore, RoutingDecision


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(system, names: list[str], mix: list[str], concurrency: int, tokens: int) -> dict:
    sx = system.local[0]
    plans = {n: system.plan(RoutingDecision("pinned", "sequence", [ExpertScore(n, 1.0)], [n])) for n in names}
    assert all(p.engine == "servers" for p in plans.values()), [p.fallback for p in plans.values()]
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    messages = {n: [{"role": "user", "content": f"Task for {n}: answer briefly. Item {i}."}] for i, n in enumerate(names)}

    async def run(seq: list[str]) -> tuple[float, list[float]]:
        todo = list(seq)
        latencies: list[float] = []

        async def client():
            while todo:
                n = todo.pop()
                t0 = time.perf_counter()
                g = await sx.agenerate(messages[n], params, plans[n])
                assert g.completion_tokens == tokens
                latencies.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(concurrency)])
        return time.perf_counter() - t0, latencies

    asyncio.run(run(list(names)))                      # warm-up: each adapter once, not counted
    before = sx.placement()
    wall, lat = asyncio.run(run(mix))
    after = sx.placement()
    lat.sort()
    return {"requests": len(mix), "seconds": round(wall, 2), "requests_per_s": round(len(mix) / wall, 3),
            "tokens_per_s": round(len(mix) * tokens / wall, 1),
            "p50_s": round(lat[len(lat) // 2], 3), "p95_s": round(lat[int(len(lat) * 0.95)], 3),
            "loads": sum(a["loads"] - b["loads"] for a, b in zip(after, before)),
            "unloads_lru": sum(a["unloads"].get("lru", 0) - b["unloads"].get("lru", 0) for a, b in zip(after, before)),
            "per_server": [{"url": a["url"], "adapters": sorted(a["adapters"]), "loads": a["loads"]} for a in after]}


def _setup(label: str, servers: list[EngineServer], slots: int, settings: Settings, names, mix, args) -> dict:
    from moerge.startup import start
    print(f"[{label}] starting {len(servers)} vLLM server(s)…", flush=True)
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait()
        system = start(settings.model_copy(update={"engine_urls": [s.url for s in servers],
                                                   "engine_max_loras": slots, "executor": "servers"}),
                       pool_dir=Path(tempfile.mkdtemp(prefix="bench-placement-")), bundled=True,
                       with_router=False, progress=lambda m: None)
        try:
            assert system.local[0].wait_ready(60)
            out = _measure(system, names, mix, args.concurrency, args.tokens)
        finally:
            system.shutdown()
    finally:
        for s in servers:
            s.stop()
    out.update(servers=len(servers), slots_per_server=slots, cores=[s.env.get("VLLM_CPU_OMP_THREADS_BIND") for s in servers])
    print(f"[{label}] {out['requests_per_s']} req/s, {out['tokens_per_s']} tok/s, p50 {out['p50_s']} s, "
          f"loads {out['loads']}, LRU unloads {out['unloads_lru']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=5)
    ap.add_argument("--punica", choices=("moerge", "vllm"), default="moerge",
                    help="the LoRA ops in the servers: moerge's plugin (what a server from this venv loads) or vLLM's")
    ap.add_argument("--out", default="runs/bench/placement.json")
    args = ap.parse_args()
    from moerge.experts.bundled import library_entries
    settings = Settings(bundled_pool=True)
    names = [e["name"] for e in library_entries()][:args.adapters]
    rng = random.Random(0)
    mix = [rng.choice(names) for _ in range(args.requests)]
    env = {"MOERGE_VLLM_PUNICA": args.punica}
    model = settings.base_model_dir
    logs = Path("runs/bench/placement-logs")
    logs.mkdir(parents=True, exist_ok=True)
    two = [EngineServer(model, _free_port(), log=logs / f"two-{i}.log", cores=str(i), env=env, max_loras=2)
           for i in range(2)]
    one = [EngineServer(model, _free_port(), log=logs / "one.log", cores="0-1", env=env, max_loras=len(names))]
    results = {"two": _setup("two", two, 2, settings, names, mix, args),
               "one": _setup("one", one, len(names), settings, names, mix, args)}
    ratio = results["two"]["requests_per_s"] / results["one"]["requests_per_s"]
    results.update(ratio_two_over_one=round(ratio, 3), adapters=names, args=vars(args),
                   when=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"requests/s, 2 servers with placement ÷ 1 server holding all {len(names)} adapters: {ratio:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
