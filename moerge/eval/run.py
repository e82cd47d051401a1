"""Set up what an evaluation needs: a private pool with the bundled library, the routed
engine, the router context, and the cache namespace (which changes with the library)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path


def prepare(settings, pool_dir: Path | None = None):
    from moerge.assets import ensure_assets
    from moerge.executors.routed import RoutedEngine
    from moerge.experts.bundled import load_bundled
    from moerge.experts.pool import open_pool
    from moerge.router.factory import build_context

    assets = ensure_assets(settings)
    pool_dir = pool_dir or Path(tempfile.mkdtemp(prefix="moerge-eval-pool-"))
    s = settings.model_copy(update={"pool_dir": pool_dir, "database_url": None})
    pool = open_pool(s)
    load_bundled(pool, progress=lambda m: None)
    engine = RoutedEngine.from_folder(assets.base_model, pool)
    ctx = build_context(pool, assets.base_model, embedder_path=str(assets.embedder))
    state = sorted((c.name, sorted(c.artifacts.items())) for c in pool.list())
    namespace = hashlib.sha256(json.dumps(["v1", state]).encode()).hexdigest()[:16]
    return pool, engine, ctx, namespace
