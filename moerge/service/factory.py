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
    if settings.executor == "reference":
        from moerge.executors.reference import ReferenceExecutor
        executor = ReferenceExecutor(assets.base_model, pool)
    else:
        raise ValueError(f"executor {settings.executor!r} is not available: use reference")
    from moerge.router.factory import build_context
    ctx = build_context(pool, assets.base_model, embedder_path=str(assets.embedder))
    from moerge.executors.remote import RemoteModelExecutor
    return Runtime(settings, pool, executor, router_ctx=ctx, remote=RemoteModelExecutor(pool))
