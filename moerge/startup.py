"""The one way to start moerge: settings → assets → pool (+ bundled library) → engines → router context.

The service, the CLI, the evaluation harness, the benchmarks and the tests all call `start`, and get
a `System`: it turns routing decisions into execution plans (moerge.plan) and runs each plan on the
engine the plan names.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field

from moerge.config import Settings
from moerge.models.generation import Generation, SamplingParams, StreamDelta
from moerge.plan import Engines, ExecutionPlan, fallback_plan, make_plan
from moerge.router.base import RoutingDecision

log = logging.getLogger("moerge.startup")


@dataclass
class System:
    settings: Settings
    assets: object
    pool: object
    local: list = field(default_factory=list)       # LoRA-plan executors, preferred first
    remote: object = None
    router_ctx: object = None

    def on_pool_change(self, event: str, name: str) -> None:
        """A removed expert leaves every engine: its resident weights and the plans that use it. After
        any change, free heap pages go back to the system (a registration allocates and frees a lot)."""
        from moerge.executors.memory import malloc_trim
        malloc_trim()
        if event != "removed":
            return
        for ex in self.local:
            forget = getattr(ex, "forget", None)
            if forget is not None:
                forget(name)

    # -- plans ---------------------------------------------------------------------------
    def engines(self) -> Engines:
        return Engines([ex.caps() for ex in self.local], remote=self.remote is not None)

    def plan(self, decision: RoutingDecision | None) -> ExecutionPlan:
        return make_plan(decision, self.pool, self.engines())

    def executor(self, plan: ExecutionPlan):
        if plan.engine == "remote":
            return self.remote
        for ex in self.local:
            if ex.name == plan.engine:
                return ex
        raise RuntimeError(f"plan names engine {plan.engine!r}, which this system does not have")

    def executor_named(self, name: str):
        return next((ex for ex in [*self.local, self.remote] if ex is not None and ex.name == name), None)

    # -- running -------------------------------------------------------------------------
    def generate(self, messages: list[dict], params: SamplingParams, plan: ExecutionPlan
                 ) -> tuple[Generation, ExecutionPlan]:
        """(generation, the plan that really ran): a failed remote model is answered by the base model."""
        from moerge.executors.remote import RemoteModelError
        try:
            return self.executor(plan).generate(messages, params, plan), plan
        except RemoteModelError as e:
            log.warning("%s", e)
            plan = fallback_plan(plan, str(e), self.engines())
            return self.executor(plan).generate(messages, params, plan), plan

    def stream(self, messages: list[dict], params: SamplingParams, plan: ExecutionPlan
               ) -> tuple[Iterator[StreamDelta], ExecutionPlan]:
        from moerge.executors.remote import RemoteModelError
        it = self.executor(plan).stream(messages, params, plan)
        if plan.engine != "remote":
            return it, plan
        try:
            first = next(it)
        except StopIteration:
            return iter(()), plan
        except RemoteModelError as e:
            log.warning("%s", e)
            plan = fallback_plan(plan, str(e), self.engines())
            return self.executor(plan).stream(messages, params, plan), plan

        def chained():
            yield first
            yield from it
        return chained(), plan

    async def agenerate(self, messages: list[dict], params: SamplingParams, plan: ExecutionPlan
                        ) -> tuple[Generation, ExecutionPlan]:
        """`generate`, awaited: an engine with `agenerate` (vLLM, remote) holds no thread while it works;
        the reference engine runs in a worker thread. A failed remote model is answered by the base model."""
        from moerge.executors.remote import RemoteModelError
        ex = self.executor(plan)
        if not hasattr(ex, "agenerate"):
            return await asyncio.to_thread(self.generate, messages, params, plan)
        try:
            return await ex.agenerate(messages, params, plan), plan
        except RemoteModelError as e:
            log.warning("%s", e)
            return await self.agenerate(messages, params, fallback_plan(plan, str(e), self.engines()))

    async def astream(self, messages: list[dict], params: SamplingParams, plan: ExecutionPlan
                      ) -> tuple[AsyncIterator[StreamDelta], ExecutionPlan]:
        """`stream`, awaited; closing the iterator cancels the engine request where the engine can. A remote
        model that fails before its first text is answered by the base model."""
        from moerge.executors.remote import RemoteModelError
        ex = self.executor(plan)
        if not hasattr(ex, "astream"):
            it, plan = await asyncio.to_thread(self.stream, messages, params, plan)
            return _in_thread(it), plan
        it = ex.astream(messages, params, plan)
        if plan.engine != "remote":
            return it, plan
        try:
            first = await anext(it)
        except StopAsyncIteration:
            return _after(None, it), plan
        except RemoteModelError as e:
            await it.aclose()
            log.warning("%s", e)
            return await self.astream(messages, params, fallback_plan(plan, str(e), self.engines()))
        return _after(first, it), plan

    def generate_many(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                      plans: list[ExecutionPlan]) -> list[Generation]:
        """Token-id prompts, each under its plan (params: one, or one per prompt); every engine gets
        its rows in one call (so vLLM batches them all, plans mixed)."""
        per = params if isinstance(params, list) else [params] * len(prompts)
        out: list[Generation | None] = [None] * len(prompts)
        by_engine: dict[str, list[int]] = {}
        for i, p in enumerate(plans):
            by_engine.setdefault(p.engine, []).append(i)
        for engine, rows in by_engine.items():
            ex = self.executor(plans[rows[0]])
            gens = ex.generate_many([prompts[i] for i in rows], [per[i] for i in rows], [plans[i] for i in rows])
            for i, g in zip(rows, gens):
                out[i] = g
        return out  # type: ignore[return-value]

    def encode(self, messages: list[dict]) -> list[int]:
        from moerge.models.chat import encode_chat
        return encode_chat(self.local[-1].tokenizer, messages)

    def complete(self, messages: list[dict], max_tokens: int) -> str:
        """Greedy base-model text, its first line only, on the preferred ready engine (the GLIDER
        instruction writer: stopping at the newline saves the tokens it would throw away)."""
        plan = self.plan(None)
        params = SamplingParams(max_tokens=max_tokens, stop=["\n"])
        return self.executor(plan).generate(messages, params, plan).text

    def complete_many(self, messages: list[list[dict]], max_tokens: int) -> list[str]:
        """`complete` for many conversations in one engine call (batched on every engine)."""
        plan = self.plan(None)
        params = SamplingParams(max_tokens=max_tokens, stop=["\n"])
        return [g.text for g in self.generate_many([self.encode(m) for m in messages], params, [plan] * len(messages))]

    def describe(self) -> dict:
        return {"engines": [ex.describe() for ex in self.local],
                "remote": self.remote.describe() if self.remote is not None else None}

    def shutdown(self) -> None:
        for ex in self.local:
            if hasattr(ex, "shutdown"):
                ex.shutdown()


async def _after(first, it: AsyncIterator) -> AsyncIterator:
    """`first` (unless None), then the rest of `it`; closing this closes `it`."""
    async with aclosing(it):
        if first is not None:
            yield first
        async for item in it:
            yield item


async def _in_thread(it: Iterator) -> AsyncIterator:
    """A blocking iterator, each step in a worker thread."""
    end = object()
    while (item := await asyncio.to_thread(next, it, end)) is not end:
        yield item


def _moe_executor(settings: Settings, pool, opts: dict):
    """The MoE engine (the pool's current MoE base, ESFT adapters over it), when settings ask for it."""
    if settings.moe_engine not in ("auto", "on", "off"):
        raise ValueError(f"moe_engine {settings.moe_engine!r}: use auto, on or off")
    if settings.moe_engine == "off":
        return None
    from moerge.moe.base import current_moe, require_moe
    base = require_moe(pool.root) if settings.moe_engine == "on" else current_moe(pool.root)
    if base is None:
        return None
    from moerge.executors.vllm_engine import VllmMoeExecutor
    moe_opts = {k: v for k, v in opts.items() if k not in ("max_resident_experts", "max_lora_rank")}
    if moe_opts.get("plan_dir") is not None:      # its own LoRA ids: its own plan folders
        from pathlib import Path
        moe_opts["plan_dir"] = Path(moe_opts["plan_dir"]) / "moe"
    return VllmMoeExecutor(base.path, adapter_rows=settings.moe_adapter_rows,
                           max_adapters=settings.moe_max_adapters, **moe_opts)


def attach_moe(system: System, vllm_options: dict | None = None) -> None:
    """Start the MoE engine on the pool's current MoE base (built after `start`), next after vLLM."""
    settings = system.settings.model_copy(update={"moe_engine": "on"})
    opts = dict(dtype=settings.vllm_dtype, cpu_threads=settings.vllm_cpu_threads,
                max_num_seqs=settings.vllm_max_num_seqs, onednn_cache=settings.vllm_onednn_cache,
                prefix_caching=settings.vllm_prefix_caching)
    opts.update(vllm_options or {})
    system.local.insert(1, _moe_executor(settings, system.pool, opts))


def start(settings: Settings, *, executor: str | None = None, pool_dir=None, bundled: bool | None = None,
          with_router: bool = True, with_writer: bool = True, vllm_options: dict | None = None,
          progress: Callable[[str], None] = print) -> System:
    """Start what `settings` describe. `executor`: "vllm" (vLLM first, the reference engine for what
    vLLM cannot run and while it starts), "servers" (the vLLM OpenAI servers at `engine_urls` first, for
    base and adapter plans; the default when engine_urls is set) or "reference" (only the reference engine).
    `pool_dir` gives a private pool (SQLite and the blobs inside it) instead of the configured one."""
    from moerge.assets import ensure_assets
    from moerge.experts.pool import open_pool

    if settings.malloc_arena_max:
        from moerge.executors.memory import limit_arenas
        limit_arenas(settings.malloc_arena_max)
    if settings.threads:
        import torch
        torch.set_num_threads(settings.threads)
    assets = ensure_assets(settings, progress=progress)
    if pool_dir is not None:
        settings = settings.model_copy(update={"pool_dir": pool_dir, "database_url": None, "pool_url": None})
    pool = open_pool(settings)
    if settings.bundled_pool if bundled is None else bundled:
        from moerge.experts.bundled import load_bundled
        load_bundled(pool, progress=progress)
    from moerge.executors.reference import ReferenceExecutor
    from moerge.executors.remote import RemoteModelExecutor
    local = [ReferenceExecutor(assets.base_model)]
    kind = executor or settings.executor
    if kind == "vllm" and executor is None and settings.engine_urls and "executor" not in settings.model_fields_set:
        kind = "servers"
    if kind == "servers":
        from moerge.executors.vllm_servers import VllmServersExecutor
        if not settings.engine_urls:
            raise ValueError("executor 'servers' needs engine_urls: set MOERGE_ENGINE_URLS to a JSON list of vLLM "
                             "OpenAI server URLs")
        local.insert(0, VllmServersExecutor(settings.engine_urls, assets.base_model,
                                            max_loras=settings.engine_max_loras,
                                            max_lora_rank=settings.vllm_max_lora_rank))
    elif kind == "vllm":
        from moerge.executors.vllm_engine import VllmExecutor
        opts = dict(max_resident_experts=settings.vllm_max_experts, max_lora_rank=settings.vllm_max_lora_rank,
                    max_num_seqs=settings.vllm_max_num_seqs, dtype=settings.vllm_dtype,
                    cpu_threads=settings.vllm_cpu_threads, onednn_cache=settings.vllm_onednn_cache,
                    prefix_caching=settings.vllm_prefix_caching)
        opts.update(vllm_options or {})
        local.insert(0, VllmExecutor(assets.base_model, **opts))
        moe = _moe_executor(settings, pool, opts)
        if moe is not None:
            local.insert(1, moe)
    elif kind != "reference":
        raise ValueError(f"executor {kind!r} is not available: use vllm, servers or reference")
    system = System(settings, assets, pool, local, RemoteModelExecutor(timeout=settings.remote_timeout_s))
    pool.on_change(system.on_pool_change)
    if with_router:
        from moerge.router.factory import build_context
        system.router_ctx = build_context(pool, system.complete if with_writer else None,
                                          embedder_path=str(assets.embedder),
                                          complete_many=system.complete_many if with_writer else None)
    return system
