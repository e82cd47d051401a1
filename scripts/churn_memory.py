"""Memory over expert register/remove cycles in one process (no vLLM): RSS every 100 cycles and the
tracemalloc allocations that grew. A lead for the load run's memory growth (docs/reliability.md).

.venv/bin/python scripts/churn_memory.py [cycles, default 300]
"""
import os, resource, tempfile, time, tracemalloc, gc
from pathlib import Path
from moerge.config import Settings
from moerge.startup import start
from moerge.experts.bundled import LIBRARY

def rss():
    return int(open(f"/proc/{os.getpid()}/statm").read().split()[1]) * 4096 / 2**20

if __name__ == "__main__":
    system = start(Settings(), executor="reference", pool_dir=Path(tempfile.mkdtemp()), bundled=True,
                   with_writer=False, progress=lambda m: None)
    from moerge.service.runtime import Runtime
    rt = Runtime(system)
    for m in ("arrow", "phatgoose", "embed"):
        rt.router(m)
    msg = [{"role": "user", "content": "What is the capital of Peru?"}]
    for i in range(20):
        system.pool.register_lora(LIBRARY / "capital_of", "churn", "Names the capital city of a country.")
        rt.plan("moerge:arrow", msg); rt.plan("moerge:phatgoose", msg)
        system.pool.remove("churn")
    import sys
    cycles = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    tracemalloc.start(10)
    print("start", round(rss()), flush=True)
    t0 = time.time()
    snap0 = None
    for i in range(cycles):
        system.pool.register_lora(LIBRARY / "capital_of", "churn", "Names the capital city of a country.")
        rt.plan("moerge:arrow", msg); rt.plan("moerge:phatgoose", msg)
        system.pool.remove("churn")
        if (i + 1) % 100 == 0:
            gc.collect()
            traced = tracemalloc.get_traced_memory()[0] / 2**20
            print(i + 1, "cycles: RSS", round(rss()), "MiB, Python-traced", round(traced, 1), "MiB,",
                  round(time.time() - t0), "s", flush=True)
        if i + 1 == cycles // 3:          # growth after warm-up: between a third of the way and the end
            gc.collect()
            snap0 = tracemalloc.take_snapshot()
    gc.collect()
    snap1 = tracemalloc.take_snapshot()
    print(f"largest growth in Python-traced memory over the last {cycles - cycles // 3} cycles:")
    for st in snap1.compare_to(snap0, "traceback")[:6]:
        print(st.size_diff // 1024, "KiB", st.count_diff)
        for line in st.traceback.format()[-8:]:
            print("   ", line)
    system.shutdown()
