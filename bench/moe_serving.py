"""ESFT adapters served over one shared MoE base (ExpertWeave-style) against one merged checkpoint per
adapter: tokens/s of mixed batches ÷ the bare MoE base, worker memory, and wall time of the same
requests on N separate engines.

.venv/bin/python -m bench.moe_serving [--out DIR] [--quick]

Synthetic ESFT adapters (random perturbations of the base's experts, seeded; each replaces 1–2
experts in every layer, as real ESFT selections do) are written once under ~/.cache/moerge/bench/.
The shared engine (VllmMoeExecutor) measures every batch mix in the same run, configurations
alternating over rounds (the order rotates each round), medians reported. The separate engines
(VllmExecutor, one merged checkpoint each) run one after another, never at once: on 2 cores,
concurrent engines would only split the same cores. JSON and a PNG plot go to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from moerge.experts.lora import read_safetensors
from moerge.models.generation import SamplingParams
from moerge.moe.base import MoeBase
from moerge.moe.esft import adapter_bytes, load_esft, merged_checkpoint, synthetic_esft
from moerge.plan import ExecutionPlan, ExpertRef

BENCH_EXPERTS = ["arith_add", "uppercase", "capital_of", "sentiment"]    # + the plain base MLP: 5 experts


def default_base() -> MoeBase:
    """The benchmark's MoE base: top-2 over the plain base MLP and 4 bundled experts, built once into a
    private pool in the cache folder (about a minute) and reused."""
    from moerge.config import get_settings
    from moerge.moe.base import current_moe
    from moerge.moe.build import build_moe
    from moerge.startup import start
    settings = get_settings()
    system = start(settings, executor="reference", pool_dir=settings.home / "bench" / "moe_pool", bundled=True,
                   with_router=False, progress=lambda m: print(m, file=sys.stderr))
    try:
        base = current_moe(system.pool.root)
        if base is None or list(base.experts[1:]) != BENCH_EXPERTS:
            base = build_moe(system.pool, system.assets.base_model, BENCH_EXPERTS,
                             progress=lambda m: print(m, file=sys.stderr))
        return base
    finally:
        system.pool.close()
ASSETS = Path.home() / ".cache/moerge/bench/moe_serving"
console = Console(width=150)
T0 = time.monotonic()


@dataclass(frozen=True)
class Setup:
    requests: int = 48
    tokens: int = 32
    mixes: tuple[int, ...] = (4, 12)      # distinct adapters in a batch; the first is also N for section 3
    rounds: int = 3
    kv_cache_gib: int = 1
    cpu_threads: str = "all"
    seed: int = 0


QUICK = Setup(requests=12, tokens=8, mixes=(2, 4), rounds=2)


def progress(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


# -- assets: synthetic adapters and their merged checkpoints ----------------------------------------
def adapter_experts(base: MoeBase, seed: int) -> dict[int, list[int]]:
    """1–2 replaced experts in every layer, drawn per adapter and layer."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(base.n_layers):
        k = 1 + int(torch.randint(2, (1,), generator=g))
        out[layer] = sorted(torch.randperm(base.n_experts, generator=g)[:k].tolist())
    return out


def make_adapters(base: MoeBase, n: int, seed: int) -> list[ExpertRef]:
    root = ASSETS / base.version[:16]
    weights = None
    refs = []
    for i in range(n):
        folder = root / f"esft-{seed}-{i}"
        if not (folder / "esft_config.json").is_file():
            weights = weights if weights is not None else read_safetensors(base.path / "model.safetensors")
            progress(f"writing synthetic ESFT adapter {i} in {folder}")
            synthetic_esft(base, folder, adapter_experts(base, 1000 * seed + i), 1000 * seed + i, weights)
        version = hashlib.sha256((folder / "esft_model.safetensors").read_bytes()).hexdigest()
        refs.append(ExpertRef(f"esft{i}", version, str(folder), 0))
    return refs


def merged_dir(base: MoeBase, ref: ExpertRef) -> Path:
    out = Path(ref.adapter_dir).with_name(Path(ref.adapter_dir).name + "-merged")
    if not (out / "model.safetensors").is_file():
        progress(f"writing merged checkpoint {out}")
        merged_checkpoint(base, load_esft(Path(ref.adapter_dir), base), out)
    return out


def checkpoint_params(path: Path) -> int:
    """Parameters in a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    total = 0
    for k, v in header.items():
        if k != "__metadata__":
            n = 1
            for d in v["shape"]:
                n *= d
            total += n
    return total


# -- measuring ----------------------------------------------------------------------------------------
def timed(ex, ids, params, plans) -> dict:
    t0 = time.perf_counter()
    gens = ex.generate_many(ids, params, plans)
    s = time.perf_counter() - t0
    tokens = sum(g.completion_tokens for g in gens)
    return {"seconds": s, "tokens": tokens, "tok_s": tokens / s}


def worker_rss(ex) -> dict:
    """The engine worker's resident MiB, then again after malloc_trim (freed heap pages given back)."""
    m = ex._call(ex.engine.collective_rpc("moerge_memory", args=(True,)))[0]
    return {"rss_mib": m["before"]["total"], "rss_trimmed_mib": m["after"]["total"]}


def alternate(ex, ids, params, configs: dict[str, list], rounds: int) -> dict[str, dict]:
    """Each configuration once per round, the order rotated each round; medians over rounds."""
    runs = {k: [] for k in configs}
    names = list(configs)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            runs[k].append(timed(ex, ids, params, configs[k]))
            progress(f"round {r + 1}/{rounds} {k}: {runs[k][-1]['tok_s']:.0f} tok/s")
    return {k: {"tok_s": statistics.median(x["tok_s"] for x in v),
                "seconds": statistics.median(x["seconds"] for x in v),
                "runs_tok_s": [round(x["tok_s"], 1) for x in v]} for k, v in runs.items()}


def wait_resident(ex, n: int, timeout: float = 60) -> list[str]:
    end = time.monotonic() + timeout
    while True:
        resident = ex.describe().get("moe", {}).get("resident_adapters", [])
        if len(resident) <= n or time.monotonic() > end:
            return resident
        time.sleep(0.5)


def run_shared(base: MoeBase, refs: list[ExpertRef], ids, setup: Setup) -> dict:
    from moerge.executors.vllm_engine import VllmMoeExecutor
    params = SamplingParams(max_tokens=setup.tokens, ignore_eos=True)
    most = max(setup.mixes)
    rows = max(sum(len(v) for v in (json.loads((Path(r.adapter_dir) / "esft_config.json").read_text())["experts"]
                                    .get(str(layer), []) for r in refs[:most])) for layer in range(base.n_layers))
    progress(f"starting the shared MoE engine ({rows} adapter rows per layer, {most} adapter slots)")
    t0 = time.monotonic()
    ex = VllmMoeExecutor(base.path, max_num_seqs=setup.requests, kv_cache_gib=setup.kv_cache_gib,
                         adapter_rows=rows, max_adapters=most, cpu_threads=setup.cpu_threads)
    try:
        if not ex.wait_ready(900):
            raise RuntimeError(f"the MoE engine did not start: {ex.error}")
        out = {"startup_s": round(time.monotonic() - t0, 1), "adapter_rows": rows, "max_adapters": most}
        plan = {r.name: ExecutionPlan("esft", (r,)) for r in refs}
        configs = {"moe": [ExecutionPlan("moe")] * len(ids)}
        for n in setup.mixes:
            configs[f"{n} adapters"] = [plan[refs[i % n].name] for i in range(len(ids))]
        memory = {}
        for k, plans in configs.items():            # warm-up; loads each mix's adapters
            timed(ex, ids, params, plans)
            memory[len(ex.describe()["moe"]["resident_adapters"])] = worker_rss(ex)
            progress(f"warm-up {k}: worker RSS {memory[max(memory)]['rss_trimmed_mib']:.0f} MiB (trimmed)")
        out["memory"] = memory
        out["all_resident"] = alternate(ex, ids, params, configs, setup.rounds)
        few = setup.mixes[0]
        for r in refs[few:most]:
            ex.forget(r.name)
        out["resident_after_forget"] = len(wait_resident(ex, few))
        progress(f"{out['resident_after_forget']} adapters resident; measuring the {few}-adapter mix again")
        out["few_resident"] = alternate(ex, ids, params, {"moe": configs["moe"], f"{few} adapters":
                                                          configs[f"{few} adapters"]}, setup.rounds)
        out["describe"] = ex.describe().get("moe", {})
        return out
    finally:
        ex.shutdown()


def run_separate(base: MoeBase, refs: list[ExpertRef], ids, setup: Setup) -> dict:
    """One merged-checkpoint engine per adapter, one after another; each gets its share of the mix."""
    from moerge.executors.vllm_engine import VllmExecutor
    params = SamplingParams(max_tokens=setup.tokens, ignore_eos=True)
    n = setup.mixes[0]
    out = {"engines": []}
    for i, ref in enumerate(refs[:n]):
        mine = [p for j, p in enumerate(ids) if j % n == i]
        progress(f"starting merged-checkpoint engine {i + 1}/{n} ({len(mine)} requests)")
        t0 = time.monotonic()
        ex = VllmExecutor(merged_dir(base, ref), max_num_seqs=setup.requests, kv_cache_gib=setup.kv_cache_gib,
                          cpu_threads=setup.cpu_threads)
        try:
            if not ex.wait_ready(900):
                raise RuntimeError(f"the merged engine did not start: {ex.error}")
            row = {"startup_s": round(time.monotonic() - t0, 1), "requests": len(mine)}
            plans = [ExecutionPlan("base")] * len(mine)
            timed(ex, mine, params, plans)             # warm-up
            if i == 0:
                row["memory"] = worker_rss(ex)
            runs = [timed(ex, mine, params, plans) for _ in range(setup.rounds)]
            row["seconds"] = statistics.median(r["seconds"] for r in runs)
            row["tokens"] = runs[0]["tokens"]
            row["runs_s"] = [round(r["seconds"], 2) for r in runs]
            progress(f"engine {i + 1}: {row['tokens']} tokens in {row['seconds']:.2f} s (median)")
            out["engines"].append(row)
        finally:
            ex.shutdown()
    out["seconds"] = sum(e["seconds"] for e in out["engines"])
    out["tokens"] = sum(e["tokens"] for e in out["engines"])
    out["memory"] = out["engines"][0]["memory"]
    return out


# -- report -------------------------------------------------------------------------------------------
def summarize(base: MoeBase, refs: list[ExpertRef], shared: dict, separate: dict, setup: Setup) -> dict:
    allr, fewr = shared["all_resident"], shared["few_resident"]
    few = setup.mixes[0]
    ratios = {f"{n} adapters ÷ moe": allr[f"{n} adapters"]["tok_s"] / allr["moe"]["tok_s"] for n in setup.mixes}
    ratios[f"{few} adapters ÷ moe, {shared['resident_after_forget']} resident"] = (
        fewr[f"{few} adapters"]["tok_s"] / fewr["moe"]["tok_s"])
    base_params = checkpoint_params(base.path / "model.safetensors")
    experts = [json.loads((Path(r.adapter_dir) / "esft_config.json").read_text())["experts"] for r in refs]
    one = separate["memory"]["rss_trimmed_mib"]
    # the shared engine's expert tables hold `adapter_rows` extra rows per layer from start-up, filled or not
    capacity = 2 * (base_params + shared["adapter_rows"] * base.n_layers * 3 * base.hidden * base.intermediate)
    memory = []
    for n, m in sorted(shared["memory"].items()):
        shared_bytes = 2 * base_params + sum(adapter_bytes(base, {int(k): v for k, v in e.items()})
                                             for e in experts[:n])
        memory.append({"adapters": n, "shared_rss_mib": m["rss_trimmed_mib"], "shared_rss_untrimmed_mib": m["rss_mib"],
                       "separate_rss_mib": n * one, "shared_analytic_mib": shared_bytes / 2**20,
                       "separate_analytic_mib": n * 2 * base_params / 2**20,
                       "shared_allocated_analytic_mib": capacity / 2**20,
                       "rss_ratio": m["rss_trimmed_mib"] / (n * one) if n else None,
                       "analytic_ratio": shared_bytes / (n * 2 * base_params) if n else None})
    shared_s = allr[f"{few} adapters"]["seconds"]
    return {"setup": asdict(setup), "base": str(base.path), "base_params": base_params,
            "adapters": {r.name: {"dir": r.adapter_dir, "experts_replaced": sum(len(v) for v in e.values())}
                         for r, e in zip(refs, experts)},
            "ratios": ratios, "memory": memory, "one_merged_engine_rss_mib": one,
            "throughput_vs_separate": {"adapters": few, "shared_seconds": shared_s,
                                       "separate_seconds": separate["seconds"],
                                       "separate_over_shared_time": separate["seconds"] / shared_s},
            "shared": shared, "separate": separate}


def print_tables(r: dict) -> None:
    s, sh = r["setup"], r["shared"]
    t = Table("batch mix (one shared engine)", "tok/s (median)", "runs", "÷ moe",
              title=f"{s['requests']} requests × {s['tokens']} tokens, {s['rounds']} rounds alternating; "
                    f"{sh['adapter_rows']} adapter rows per layer")
    for k, v in sh["all_resident"].items():
        ratio = v["tok_s"] / sh["all_resident"]["moe"]["tok_s"]
        t.add_row(f"{k} ({max(s['mixes'])} resident)", f"{v['tok_s']:.0f}", str(v["runs_tok_s"]), f"{ratio:.2f}")
    for k, v in sh["few_resident"].items():
        ratio = v["tok_s"] / sh["few_resident"]["moe"]["tok_s"]
        t.add_row(f"{k} ({sh['resident_after_forget']} resident)", f"{v['tok_s']:.0f}", str(v["runs_tok_s"]),
                  f"{ratio:.2f}")
    console.print(t)
    t = Table("adapters N", "shared engine RSS", "N × one merged engine", "ratio", "shared analytic (allocated)",
              "N × merged analytic", "ratio",
              title="worker memory, MiB (RSS after malloc_trim; analytic = parameters × 2 bytes; allocated = "
                    "with every adapter row)")
    for m in r["memory"]:
        t.add_row(str(m["adapters"]), f"{m['shared_rss_mib']:.0f}", f"{m['separate_rss_mib']:.0f}",
                  f"{m['rss_ratio']:.2f}" if m["rss_ratio"] else "–",
                  f"{m['shared_analytic_mib']:.0f} ({m['shared_allocated_analytic_mib']:.0f})",
                  f"{m['separate_analytic_mib']:.0f}", f"{m['analytic_ratio']:.2f}" if m["analytic_ratio"] else "–")
    console.print(t)
    tv = r["throughput_vs_separate"]
    console.print(f"{s['requests']} requests over {tv['adapters']} adapters: "
                  f"shared engine {tv['shared_seconds']:.2f} s; "
                  f"{tv['adapters']} merged engines one after another (each its {s['requests'] // tv['adapters']} "
                  f"requests, all cores) {tv['separate_seconds']:.2f} s in total: separate ÷ shared wall time = "
                  f"{tv['separate_over_shared_time']:.2f}")


def plot(r: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sh = r["shared"]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 4))
    labels = [f"{k}\n({max(r['setup']['mixes'])} res.)" for k in sh["all_resident"]]
    labels += [f"{k}\n({sh['resident_after_forget']} res.)" for k in sh["few_resident"]]
    vals = [v["tok_s"] for v in sh["all_resident"].values()] + [v["tok_s"] for v in sh["few_resident"].values()]
    a1.bar(labels, vals, color=["C0", "C1", "C2", "C0", "C1"][:len(vals)])
    a1.set_ylabel("tokens/s (median)")
    a1.set_title("shared MoE engine, one batch", fontsize=9)
    a1.tick_params(axis="x", labelsize=7)
    ns = [m["adapters"] for m in r["memory"]]
    a2.plot(ns, [m["shared_rss_mib"] for m in r["memory"]], "o-", label="shared engine RSS")
    a2.plot(ns, [m["separate_rss_mib"] for m in r["memory"]], "s-", label="N × merged engine RSS")
    a2.plot(ns, [m["shared_analytic_mib"] for m in r["memory"]], "o--", label="shared, analytic")
    a2.plot(ns, [m["separate_analytic_mib"] for m in r["memory"]], "s--", label="N × merged, analytic")
    a2.plot(ns, [m["shared_allocated_analytic_mib"] for m in r["memory"]], ":", label="shared, all rows allocated")
    a2.set_xlabel("adapters resident N")
    a2.set_ylabel("MiB")
    a2.legend(fontsize=7)
    a2.set_title("worker memory", fontsize=9)
    tv = r["throughput_vs_separate"]
    a3.bar(["shared engine", f"{tv['adapters']} merged engines\n(one after another)"],
           [tv["shared_seconds"], tv["separate_seconds"]], color=["C0", "C3"])
    a3.set_ylabel("wall seconds")
    a3.set_title(f"{r['setup']['requests']} requests × {r['setup']['tokens']} tokens over {tv['adapters']} adapters",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench/moe_serving"))
    ap.add_argument("--quick", action="store_true", help="12 requests × 8 tokens, mixes of 2 and 4, N=2")
    ap.add_argument("--base", type=Path, default=None, help="an MoE base folder (default: built from the "
                    "bundled library in the cache folder)")
    args = ap.parse_args(argv)
    setup = QUICK if args.quick else Setup()
    base = MoeBase.load(args.base) if args.base is not None else default_base()
    refs = make_adapters(base, max(setup.mixes), setup.seed)
    for ref in refs[:setup.mixes[0]]:
        merged_dir(base, ref)
    from moerge.models.chat import encode_chat
    from moerge.tasks import HELD_IN, get_task
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(base.path))
    prompts = [x.prompt for t in HELD_IN for x in get_task(t).samples(4, 1, "eval")]
    ids = [encode_chat(tok, [{"role": "user", "content": prompts[i % len(prompts)]}]) for i in range(setup.requests)]
    shared = run_shared(base, refs, ids, setup)
    separate = run_separate(base, refs, ids, setup)
    result = summarize(base, refs, shared, separate, setup)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    plot(result, args.out / "moe_serving.png")
    print_tables(result)
    print(f"JSON in {args.out / 'results.json'}, plot in {args.out / 'moe_serving.png'}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
