"""The vLLM engine's oneDNN caches: memory growth and speed, moerge's bound against oneDNN's default.

Two engines run side by side in this process, one started with each capacity of the process-wide
primitive caches (`Settings.vllm_onednn_cache`: ONEDNN_PRIMITIVE_CACHE_CAPACITY and torch's
LRU_CACHE_CAPACITY). Both get the same rounds, alternately (which engine goes first swaps every
round, so competing load hits both alike): a random number of requests (1..batch) of random prompt
length, as under real load, for each plan kind (base, a pinned adapter, token-level arrow). Printed:
each engine's worker memory growth after malloc_trim over all rounds, and the time its rounds took,
with the ratios.

python -m bench.engine_caches [--rounds 30] [--batch 32] [--caches 1024 16] [--kinds base adapter arrow]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from moerge.config import Settings
from moerge.models.generation import SamplingParams
from moerge.startup import start

PROMPTS = ["What is 345 + 210? Answer with the number only.", "Convert to upper case: the cat sat on the mat",
           "What is the capital of Peru?", "Reverse the order of the words: red green blue"]
MODELS = {"base": "base", "adapter": "uppercase", "arrow": "moerge:arrow"}


class Engine:
    def __init__(self, cache: int):
        self.cache = cache
        self.system = start(Settings(vllm_onednn_cache=cache), executor="vllm", pool_dir=Path(tempfile.mkdtemp()),
                            bundled=True, with_writer=False, with_router=True, progress=lambda m: None)
        self.ex = self.system.local[0]
        assert self.ex.wait_ready(900), "vLLM did not start"
        from moerge.service.runtime import Runtime
        self.runtime = Runtime(self.system)
        self.seconds = 0.0
        self.requests = 0

    def memory(self, trim: bool = False) -> dict:
        out = self.ex._call(self.ex.engine.collective_rpc("moerge_memory", args=(trim,)))[0]
        return out["after" if trim else "before"]

    def run(self, batch: list[list[int]], plans, params) -> None:
        t0 = time.perf_counter()
        self.ex.generate_many(batch, params, plans)
        self.seconds += time.perf_counter() - t0
        self.requests += len(batch)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30, help="rounds per plan kind")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--caches", nargs=2, type=int, default=[1024, Settings().vllm_onednn_cache])
    ap.add_argument("--kinds", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--out", default="runs/bench/engine_caches.json")
    args = ap.parse_args()
    engines = []
    for cache in args.caches:          # each engine's processes read the capacity when they start
        print(f"starting the engine with caches of {cache}", flush=True)
        engines.append(Engine(cache))
    from moerge.models.chat import encode_chat
    params = SamplingParams(max_tokens=12, temperature=0.0)
    msgs = [[{"role": "user", "content": p}] for p in PROMPTS]
    ids = [encode_chat(engines[0].ex.tokenizer, m) for m in msgs]
    for e in engines:                  # warm-up, then the starting point
        for kind in args.kinds:
            e.run(ids, [e.runtime.plan(MODELS[kind], m).execution for m in msgs], params)
        e.start_mib = e.memory(trim=True)["total"]
        e.seconds, e.requests = 0.0, 0
    rng = random.Random(0)
    r = 0
    for kind in args.kinds:
        plans = {id(e): [e.runtime.plan(MODELS[kind], m).execution for m in msgs] for e in engines}
        for _ in range(args.rounds):
            n = rng.randint(1, args.batch)
            batch = [ids[i % 4][:3] + [ids[i % 4][3]] * rng.randint(0, 300) + ids[i % 4][3:] for i in range(n)]
            order = engines if r % 2 == 0 else engines[::-1]
            for e in order:
                e.run(batch, [plans[id(e)][i % 4] for i in range(n)], params)
            r += 1
        growth = ", ".join(f"cache {e.cache}: {e.memory(trim=True)['total'] - e.start_mib:+.1f} MiB" for e in engines)
        print(f"after the {kind} rounds: {growth}", flush=True)
    result = {"rounds_per_kind": args.rounds, "kinds": args.kinds, "engines": []}
    for e in engines:
        end = e.memory(trim=True)["total"]
        result["engines"].append({"cache": e.cache, "requests": e.requests, "seconds": round(e.seconds, 1),
                                  "start_mib": e.start_mib, "end_mib": end, "growth_mib": round(end - e.start_mib, 1)})
    a, b = result["engines"]
    result["time_ratio"] = round(b["seconds"] / a["seconds"], 3)
    print("\n| caches | requests | seconds | worker growth after trim (MiB) |\n|---|---|---|---|")
    for e in result["engines"]:
        print(f"| {e['cache']} | {e['requests']} | {e['seconds']} | {e['growth_mib']:+.1f} |")
    print(f"time with caches of {b['cache']} / with {a['cache']}: {result['time_ratio']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")
    for e in engines:
        e.system.shutdown()


if __name__ == "__main__":
    main()
