"""Replay of the moerge vLLM plugin's per-layer work outside vLLM: 120 LoRA calls per forward
(30 layers × qkv, o, gate_up, down) over the 12 bundled experts, next to the base linears alone.

python bench/plugin_replay.py [bfloat16|float32] [tokens] [token|fixed: print a profile]
"""
import time, torch, json, sys
from pathlib import Path
torch.set_num_threads(2)
from moerge.executors.vllm_plans import STATE, WorkerPlan, ModuleInfo
from moerge.executors.vllm_punica import MoergePunicaCPU
from moerge.plan import ExpertRef
lib = Path("moerge/experts/library")
tasks = sorted(p.name for p in lib.iterdir() if (p / "adapter_model.safetensors").exists())
refs = [ExpertRef(t, t * 4, str(lib / t), 4, (("arrow", str(lib / t / "gate.safetensors")), ("gate", str(lib / t / "gate.safetensors")))) for t in tasks]
dt = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "bfloat16")
STATE.dtype = dt
class M:  # a fake LoRA layer
    def __init__(self, sizes): self.lora_a_stacked = (object(),); self.output_slices = sizes
mods = []
for l in range(30):
    for name, sizes, din in (("self_attn.qkv_proj", (576, 192, 192), 576), ("self_attn.o_proj", (576,), 576),
                             ("mlp.gate_up_proj", (1536, 1536), 576), ("mlp.down_proj", (576,), 1536)):
        m = M(sizes); STATE.register_module(f"model.layers.{l}.{name}", m)
        mods.append((m, din, sum(sizes)))
for i, r in enumerate(refs):
    STATE._make_resident(r, set())
    STATE.plans[i + 1] = WorkerPlan(i + 1, "adapter", [r], [1.0])
STATE.plans[100] = WorkerPlan(100, "token_mixture", refs, mode="phatgoose", gate_set="gate", bias=[0.0] * 12, top_k=2)
w = MoergePunicaCPU(4096, 256, "cpu")
T = int(sys.argv[2]) if len(sys.argv) > 2 else 48
W = [torch.randn(n, din, dtype=dt) for _, din, n in mods]
X = {576: torch.randn(T, 576, dtype=dt), 1536: torch.randn(T, 1536, dtype=dt)}
def base():
    for (m, din, n), wt in zip(mods, W):
        y = X[din] @ wt.T
def run(ids):
    batch = STATE.begin_batch(ids)
    for (m, din, n), wt in zip(mods, W):
        y = X[din] @ wt.T
        w._plans(y, X[din], STATE.modules[id(m.lora_a_stacked)], batch)
for label, ids in [("base", None), ("base", None), ("1 adapter", [1] * T), ("12 adapters", [1 + i % 12 for i in range(T)]), ("token", [100] * T), ("mixed", [0 if i % 3 == 0 else (1 + i % 12 if i % 3 == 1 else 100) for i in range(T)]), ("base", None)]:
    f = base if ids is None else (lambda ids=ids: run(ids))
    f(); f()
    t0 = time.perf_counter(); n = 10
    for _ in range(n): f()
    print(f"{label:12s} {(time.perf_counter() - t0) / n * 1000:7.2f} ms per forward (layer linears only)")
if len(sys.argv) > 3:
    from torch.profiler import profile
    ids = [100] * T if sys.argv[3] == "token" else [1 + i % 12 for i in range(T)]
    with profile() as prof:
        for _ in range(3): run(ids)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
