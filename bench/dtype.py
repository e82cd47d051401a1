"""float32 against bfloat16 on this CPU, side by side in one run: what `auto` (moerge/compute.py) decides on.

python -m bench.dtype [--vllm]    (--vllm adds two vLLM engine starts: 16 prompts x 32 tokens in each dtype)

Prints a 1024x576x1536 matmul's GFLOP/s, a base-model training step (16 sequences x 64 tokens, forward and
backward, LoRA-free) and, with --vllm, vLLM's generation tok/s; each as bf16 / fp32, with what `auto`
resolves to here. Saves runs/bench/dtype.json.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from moerge import compute


def _best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul() -> dict:
    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
    out = {}
    for name in ("float32", "bfloat16"):
        x, y = a.to(getattr(torch, name)), b.to(getattr(torch, name))
        out[name] = round(2 * 1024 * 576 * 1536 / _best(lambda: x @ y, 10) / 1e9, 1)
    return out


def train_step(base_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.config.use_cache = False
    ids = torch.randint(100, 20000, (16, 64), generator=torch.Generator().manual_seed(0))
    out = {}
    for name in ("float32", "bfloat16"):
        def step():
            with compute.autocast(name):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
        out[name] = round(_best(step, 2), 2)
    return out


def vllm_tok_s(base_dir: Path) -> dict:
    """Each dtype in its own engine process, one after the other (the engine takes all of the cores)."""
    import subprocess
    out = {}
    code = ("import sys,time; from vllm import LLM, SamplingParams; "
            "llm = LLM(model=sys.argv[1], dtype=sys.argv[2], max_model_len=512, gpu_memory_utilization=0.5); "
            "p = SamplingParams(max_tokens=32, ignore_eos=True, temperature=0); prompts = [f'Tell me about {i}' for i in range(16)]; "
            "llm.generate(prompts[:2], p); t = time.perf_counter(); llm.generate(prompts, p); "
            "print('TOKS', 16 * 32 / (time.perf_counter() - t))")
    for name in ("float32", "bfloat16"):
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
        r = subprocess.run([sys.executable, "-c", code, str(base_dir), name], capture_output=True, text=True, env=env,
                           timeout=1800)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("TOKS")]
        if not line:
            raise RuntimeError(f"vLLM in {name} failed: {r.stderr[-2000:]}")
        out[name] = round(float(line[0].split()[1]), 1)
    return out


def run(with_vllm: bool = False) -> dict:
    from moerge.config import get_settings
    base = get_settings().base_model_dir
    info = compute.describe()
    res = {"cpu": info, "matmul_gflops": matmul(), "train_step_s": train_step(base)}
    if with_vllm:
        res["vllm_tok_s"] = vllm_tok_s(base)
    m, t = res["matmul_gflops"], res["train_step_s"]
    print(f"CPU bf16 flags: {info['cpu_bf16_flags'] or 'none'} ({info['cpu_capability']}); auto -> {info['compute_dtype']}")
    print(f"matmul 1024x576x1536: fp32 {m['float32']} GFLOP/s, bf16 {m['bfloat16']} GFLOP/s "
          f"(bf16 / fp32 = {m['bfloat16'] / m['float32']:.2f})")
    print(f"train step 16x64 tokens: fp32 {t['float32']} s, bf16 autocast {t['bfloat16']} s "
          f"(bf16 speed / fp32 = {t['float32'] / t['bfloat16']:.2f})")
    if with_vllm:
        v = res["vllm_tok_s"]
        print(f"vLLM 16 prompts x 32 tokens: fp32 {v['float32']} tok/s, bf16 {v['bfloat16']} tok/s "
              f"(bf16 / fp32 = {v['bfloat16'] / v['float32']:.2f})")
    out = Path("runs/bench")
    out.mkdir(parents=True, exist_ok=True)
    (out / "dtype.json").write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    run("--vllm" in sys.argv[1:])
