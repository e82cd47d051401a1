"""Registering and removing an expert, over and over, keeps no memory: a long-running service
registers experts for months. safetensors' default mmap loader keeps ~110 bytes of Python objects
per tensor alive for good (0.8.0); moerge reads adapters with pread instead (lora.read_safetensors)."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from moerge.experts.bundled import LIBRARY
from moerge.experts.lora import read_safetensors
from moerge.experts.pool import ExpertPool

ADAPTER = LIBRARY / "capital_of"


def _retained_kib(fn, n: int) -> float:
    """Python memory still allocated after `n` calls of fn (after a warm-up), KiB per call."""
    for _ in range(3):
        fn()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(n):
            fn()
        gc.collect()
        return (tracemalloc.get_traced_memory()[0] - before) / n / 1024
    finally:
        tracemalloc.stop()


def test_reading_an_adapter_keeps_nothing_alive():
    from safetensors.torch import load_file
    path = ADAPTER / "adapter_model.safetensors"
    n_tensors = len(read_safetensors(path))
    ours = _retained_kib(lambda: read_safetensors(path), 100)
    # the check can tell: safetensors' default backend keeps objects per tensor (if a future
    # safetensors fixes that, this line says so and moerge may go back to the default)
    default = _retained_kib(lambda: load_file(str(path)), 100)
    print(f"{n_tensors} tensors: retained per load {ours:.2f} KiB (pread) vs {default:.2f} KiB (mmap default)")
    assert ours < 2.0, ours
    assert default > 5 * max(ours, 0.1), (default, ours)


@pytest.mark.real
def test_register_and_remove_cycles_keep_no_python_memory(tmp_path, real_spec, embedder):
    pool = ExpertPool(tmp_path / "pool", f"sqlite:///{tmp_path}/r.sqlite", real_spec, embed=embedder.encode)

    def cycle():
        pool.register_lora(ADAPTER, "churn", "Names the capital city of a country.", examples=["capital of Peru?"])
        pool.remove("churn")

    per_cycle = _retained_kib(cycle, 30)
    print(f"retained per register/remove cycle: {per_cycle:.2f} KiB")
    # an adapter's 210 tensors through the mmap loader kept ~23 KiB per cycle
    assert per_cycle < 8.0, per_cycle
    pool.close()
