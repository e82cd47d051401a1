"""The compute dtype: bf16 only where the CPU does bf16 natively (moerge/compute.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moerge import compute

X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse avx2\n"
X86_BF16 = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 avx512_vnni\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_cpu_flags_read_x86_and_arm_cpuinfo():
    assert compute.cpu_flags(X86_AVX2) == {"fpu", "sse", "sse2", "avx", "avx2", "fma"}
    assert compute.native_bf16_flags(compute.cpu_flags(X86_AVX2)) == []
    assert compute.native_bf16_flags(compute.cpu_flags(X86_BF16)) == ["avx512_bf16"]
    assert compute.native_bf16_flags(compute.cpu_flags(ARM_BF16)) == ["bf16"]


@pytest.mark.parametrize("native,expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_follows_the_cpu_and_explicit_choices_stand(monkeypatch, native, expected):
    monkeypatch.setattr(compute, "native_bf16", lambda: native)
    monkeypatch.delenv("MOERGE_DTYPE", raising=False)
    assert compute.resolve_dtype() == expected
    assert compute.resolve_dtype("auto") == expected
    assert compute.resolve_dtype("float32") == "float32"
    assert compute.resolve_dtype("bfloat16") == "bfloat16"
    monkeypatch.setenv("MOERGE_DTYPE", "float32")
    assert compute.resolve_dtype() == "float32"
    x = torch.randn(4, 8)
    with compute.autocast("auto"):
        y = x @ x.T
    assert y.dtype == getattr(torch, expected)


def test_bad_dtypes_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="auto, bfloat16, float32"):
        compute.resolve_dtype("float16")
    from moerge.config import Settings
    with pytest.raises(ValueError, match="auto, bfloat16, float32"):
        Settings(vllm_dtype="fp16")
    assert Settings().vllm_dtype == "auto"


def test_this_machine_resolves_from_its_own_flags():
    """`moerge config` reports what this CPU's /proc/cpuinfo says, read here independently."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this system")
    native = bool({"avx512_bf16", "amx_bf16", "bf16"} & set(text.split()))
    out = subprocess.run([sys.executable, "-m", "moerge.cli", "config", "--json"], capture_output=True, text=True,
                         check=True, env={k: v for k, v in os.environ.items() if k != "MOERGE_DTYPE"})
    data = json.loads(out.stdout)
    assert data["compute"]["native_bf16"] is native
    assert data["vllm_dtype_resolved"] == ("bfloat16" if native else "float32")
    assert data["compute"]["compute_dtype"] == data["vllm_dtype_resolved"]


@pytest.mark.real
def test_the_vllm_executor_resolves_auto_before_it_starts(base_model_dir, monkeypatch):
    from moerge.executors.vllm_engine import VllmExecutor
    for k in ("VLLM_CPU_KVCACHE_SPACE", "MOERGE_PLUGIN_CAPACITY", "MOERGE_PLUGIN_DTYPE", "ONEDNN_PRIMITIVE_CACHE_CAPACITY",
              "LRU_CACHE_CAPACITY", "MOERGE_DTYPE"):   # the executor sets these for its engine: restored after
        monkeypatch.delenv(k, raising=False)
    ex = VllmExecutor(base_model_dir, start=False)
    assert ex.dtype == compute.resolve_dtype("auto")
    assert ex.engine_kwargs["dtype"] == ex.dtype
    assert ex.describe()["dtype"] == ex.dtype
    ex._loop.close()           # never started: nothing else to end
