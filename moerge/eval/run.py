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


class FastEngine:
    """The vLLM executor for evaluation, started on first use (a run served from the cache never
    starts it). fp32 like the reference engine: its greedy answers match the reference engine's
    (tests/executors/test_vllm.py). Every library adapter fits in one batch. It computes on
    every core: the harness waits while vLLM generates."""

    def __init__(self, settings, pool):
        self.settings, self.pool = settings, pool
        self.max_lora_rank = settings.vllm_max_lora_rank
        self._vx = None

    def _engine(self):
        if self._vx is None:
            from moerge.assets import ensure_assets
            from moerge.executors.vllm_engine import VllmExecutor
            assets = ensure_assets(self.settings)
            n_lora = max(1, sum(c.kind == "lora" for c in self.pool.list()))
            self._vx = VllmExecutor(assets.base_model, self.pool, max_loras=min(n_lora, 16),
                                    max_lora_rank=self.max_lora_rank, max_num_seqs=64, dtype="float32",
                                    cpu_threads="all")
            self._vx.wait_ready(900)
        return self._vx

    def generate_many(self, prompts, params, adapters):
        return self._engine().generate_many(prompts, params, adapters)

    def shutdown(self) -> None:
        if self._vx is not None:
            self._vx.shutdown()
            self._vx = None
