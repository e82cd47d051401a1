"""Set up what an evaluation needs (through moerge.startup): a private pool with the bundled
library, the engines, the router context, and the cache namespace (which changes with the library)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path


def prepare(settings, pool_dir: Path | None = None, engine: str = "auto", dtype: str = "auto",
            progress=lambda m: None, moe: bool = False, joint: bool = False):
    """(system, namespace). engine "auto": vLLM on every core (the harness waits while it generates)
    with the reference engine for TIES; "reference": the reference engine only. In fp32, vLLM's
    greedy tokens equal the reference engine's (tests/executors/test_vllm.py); bf16 (auto's choice on a CPU
    with native bf16) is 2-3x as fast there and may change a near-tie token; without native bf16 auto is fp32."""
    from moerge.compute import resolve_dtype
    from moerge.startup import start

    dtype = resolve_dtype(dtype)

    pool_dir = pool_dir or Path(tempfile.mkdtemp(prefix="moerge-eval-pool-"))
    opts = dict(dtype=dtype, cpu_threads="all", max_num_seqs=64)
    system = start(settings, executor="vllm" if engine == "auto" else "reference", pool_dir=pool_dir, bundled=True,
                   vllm_options=opts, progress=progress)
    if moe:       # the `moe` method: an MoE base upcycled from this pool's experts, in its own engine
        if engine != "auto":
            raise ValueError("the moe method runs on the MoE engine (vLLM): use --engine auto")
        from moerge.moe.build import build_moe
        from moerge.startup import attach_moe
        build_moe(system.pool, system.assets.base_model, progress=progress)
        attach_moe(system, opts)
    if joint:     # the `joint` router: a joint gate set for this pool's experts (cached across evaluations)
        from moerge.experts.joint_gates import ensure_joint
        ensure_joint(system.pool, system.assets.base_model, settings.home / "joint-gates", progress=progress)
    if engine == "auto":
        for ex in system.local[:-1]:
            ex.wait_ready(900)
    state = sorted((c.name, sorted(c.artifacts.items())) for c in system.pool.list())
    namespace = hashlib.sha256(json.dumps(["v2", dtype if engine == "auto" else "float32", state]).encode()).hexdigest()[:16]
    return system, namespace
