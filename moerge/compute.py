"""The compute dtype, chosen from what this CPU does natively.

bfloat16 halves memory traffic, and on a CPU with bf16 instructions (x86 avx512_bf16 or AMX, Arm's bf16
extension) oneDNN runs it 2-3x faster than float32. On a CPU without them every bf16 matmul is emulated:
measured on an AVX2-only AMD EPYC, a 1024x576x1536 matmul ran 149 GFLOP/s in float32 and 1.3 GFLOP/s in
bf16, and vLLM served 16 prompts x 32 tokens at 116 tok/s in float32 against 28 tok/s in bf16. On an
avx512_bf16 EPYC the same matmul ran 162 GFLOP/s in float32 and 405 in bf16 (docs/results/compute.md,
`python -m bench.dtype`). So "auto" picks bf16 only where it is native.

One knob decides it everywhere (vLLM engines, the reference engine's generation, expert, gate and ESFT
training): `MOERGE_DTYPE` = auto | bfloat16 | float32, default auto. vLLM's own dtype (`MOERGE_VLLM_DTYPE`,
`moerge eval --dtype`) defaults to auto as well and resolves the same way. Stored weights stay bf16
whatever the compute dtype: storage and compute are separate choices.
"""
from __future__ import annotations

import contextlib
import os
import platform
from functools import lru_cache

DTYPES = ("auto", "bfloat16", "float32")
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")            # x86 (Cooper Lake+, Zen 4+), AMX, Arm's FEAT_BF16


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (x86 'flags', Arm 'Features') from /proc/cpuinfo; empty where it is absent."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def native_bf16_flags(flags: set[str]) -> list[str]:
    return [f for f in BF16_FLAGS if f in flags]


@lru_cache(maxsize=1)
def native_bf16() -> bool:
    """True where the CPU has bf16 arithmetic (its flags say so); macOS on Apple silicon counts as native."""
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return True
    return bool(native_bf16_flags(cpu_flags()))


def check_dtype(name: str) -> str:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    return name


def resolve_dtype(name: str | None = None) -> str:
    """'bfloat16' or 'float32'. `name` None reads MOERGE_DTYPE (default auto); auto is bf16 only where native."""
    name = check_dtype(name if name is not None else os.environ.get("MOERGE_DTYPE", "auto"))
    if name == "auto":
        return "bfloat16" if native_bf16() else "float32"
    return name


def autocast(name: str | None = None):
    """A bf16 CPU autocast where the compute dtype is bf16, else nothing (the model stays float32)."""
    if resolve_dtype(name) == "bfloat16":
        import torch
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe() -> dict:
    """What `moerge config` and the engines report: the resolved dtype and why."""
    import torch
    flags = cpu_flags()
    setting = os.environ.get("MOERGE_DTYPE", "auto")
    return {"setting": setting, "compute_dtype": resolve_dtype(setting),
            "native_bf16": native_bf16(), "cpu_bf16_flags": native_bf16_flags(flags),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
