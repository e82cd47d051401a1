"""Build the runtime a `moerge serve` process needs, from settings."""

from __future__ import annotations

from moerge.assets import ensure_assets
from moerge.config import Settings
from moerge.experts.pool import open_pool
from moerge.service.runtime import Runtime


def build_runtime(settings: Settings, progress=print) -> Runtime:
    if settings.threads:
        import torch
        torch.set_num_threads(settings.threads)
    assets = ensure_assets(settings, progress=progress)
    pool = open_pool(settings)
    if settings.bundled_pool:
        from moerge.experts.bundled import load_bundled
        load_bundled(pool, progress=progress)
    from moerge.executors.reference import ReferenceExecutor
    reference = ReferenceExecutor(assets.base_model, pool)
    if settings.executor == "reference":
        executor = reference
    elif settings.executor == "vllm":
        from moerge.executors.vllm_engine import VllmExecutor
        executor = VllmExecutor(assets.base_model, pool, fallback=reference, max_loras=settings.vllm_max_loras,
                                max_lora_rank=settings.vllm_max_lora_rank, dtype=settings.vllm_dtype,
                                cpu_threads=settings.vllm_cpu_threads)
    else:
        raise ValueError(f"executor {settings.executor!r} is not available: use vllm or reference")
    from moerge.router.factory import build_context
    ctx = build_context(pool, assets.base_model, embedder_path=str(assets.embedder))
    from moerge.executors.remote import RemoteModelExecutor
    return Runtime(settings, pool, executor, router_ctx=ctx, remote=RemoteModelExecutor(pool))
