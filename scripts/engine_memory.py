"""The vLLM worker's memory over rounds of requests of one plan kind, then after malloc_trim.

For each kind (base, a pinned adapter, token-level arrow): `--rounds` rounds of `--batch` requests
submitted at once (12 greedy tokens each); the worker's resident MiB (total and its brk heap) after
every 5 rounds; then the same after malloc_trim(0) in the worker. Growth that trimming gives back is
freed memory glibc kept; growth that stays is memory still held. A diagnostic for the load run
(docs/reliability.md), not a benchmark.

.venv/bin/python scripts/engine_memory.py [--rounds 40] [--batch 32] [--kinds base adapter arrow] [--vary]
"""
import argparse
import random
import tempfile
from pathlib import Path

from moerge.config import Settings
from moerge.models.generation import SamplingParams
from moerge.startup import start

PROMPTS = ["What is 345 + 210? Answer with the number only.", "Convert to upper case: the cat sat on the mat",
           "What is the capital of Peru?", "Reverse the order of the words: red green blue"]
MODELS = {"base": "base", "adapter": "uppercase", "arrow": "moerge:arrow", "phatgoose": "moerge:phatgoose"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vary", action="store_true",
                    help="a random batch size (1..batch) and prompt length each round, as under real load")
    ap.add_argument("--kinds", nargs="+", default=["base", "adapter", "arrow"], choices=list(MODELS))
    args = ap.parse_args()
    system = start(Settings(), executor="vllm", pool_dir=Path(tempfile.mkdtemp()), bundled=True, with_writer=False,
                   progress=lambda m: None)
    from moerge.models.chat import encode_chat
    from moerge.service.runtime import Runtime
    rt = Runtime(system)
    ex = system.local[0]
    assert ex.wait_ready(900), "vLLM did not start"

    def memory(trim=False):
        return ex._call(ex.engine.collective_rpc("moerge_memory", args=(trim,)))[0]

    params = SamplingParams(max_tokens=12, temperature=0.0)
    for kind in args.kinds:
        msgs = [[{"role": "user", "content": p}] for p in PROMPTS]
        plans = [rt.plan(MODELS[kind], m).execution for m in msgs]
        ids = [encode_chat(ex.tokenizer, m) for m in msgs]
        ex.generate_many(ids, params, plans)          # warm-up
        m0 = memory()["before"]
        print(f"{kind}: start total {m0['total']} MiB, heap {m0['heap']} MiB", flush=True)
        rng = random.Random(0)
        sent = 0
        for r in range(1, args.rounds + 1):
            n = rng.randint(1, args.batch) if args.vary else args.batch
            batch = [ids[i % 4] for i in range(n)]
            if args.vary:             # a different number of prompt tokens per request
                batch = [p[:3] + [p[3]] * rng.randint(0, 300) + p[3:] for p in batch]
            ex.generate_many(batch, params, [plans[i % 4] for i in range(n)])
            sent += n
            if r % 5 == 0:
                m = memory()["before"]
                print(f"  round {r:3} ({sent} requests): total {m['total']} MiB (+{m['total'] - m0['total']:.1f}), "
                      f"heap {m['heap']} MiB (+{m['heap'] - m0['heap']:.1f})", flush=True)
        t = memory(trim=True)
        print(f"  after malloc_trim: total {t['after']['total']} MiB (+{t['after']['total'] - m0['total']:.1f}), "
              f"heap {t['after']['heap']} MiB (+{t['after']['heap'] - m0['heap']:.1f})", flush=True)
    system.shutdown()


if __name__ == "__main__":
    main()
