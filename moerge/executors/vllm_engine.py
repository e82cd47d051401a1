"""vLLM executor: one AsyncLLM engine runs base, adapter, token-mixture and static-mixture plans,
all in shared batches.

Each non-base plan travels as a LoRA request whose folder holds `moerge_plan.json` (a rank-1
zero adapter around it, so vLLM maps the request's tokens to it); the moerge plugin in the
engine process reads the plan and applies it (vllm_plans.py, vllm_punica.py). Adapter and static
plans share one LoRA id per plan; a token-mixture plan gets an id per request, so its per-layer
routing usage is its own and is collected when it finishes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from pathlib import Path

from moerge.compute import resolve_dtype
from moerge.config import cpu_core_list
from moerge.experts.errors import ExpertError
from moerge.models.chat import encode_chat
from moerge.models.generation import Generation, SamplingParams, StreamDelta
from moerge.plan import EngineCaps, ExecutionPlan, PlanError
from moerge.executors.vllm_plans import PLAN_FILE

log = logging.getLogger("moerge.vllm")
VLLM_KINDS = frozenset({"base", "adapter", "token_mixture", "static_mixture"})
_UNIQUE_BASE = 1_000_000


def bind_cpu_threads(spec: str) -> None:
    """Which cores vLLM's CPU worker computes on; read by the engine process when it starts.

    "auto" keeps vLLM's default (it reserves a core for the front end: on 2 cores it computes
    on one). "all" uses every core: on this 2-core machine 1.55× the tokens/s of "auto" for a
    48-request batch (README, Benchmarks), at the cost of sharing the cores with the server.
    """
    cores = cpu_core_list(spec)
    if cores is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cores
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"


class PlanAdapters:
    """Plan folders for vLLM: a shared rank-1 zero adapter plus each plan's `moerge_plan.json`."""

    def __init__(self, model_dir: Path, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="moerge-vllm-plans-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self._blank = self.root / "_blank"
        if not (self._blank / "adapter_model.safetensors").exists():
            self._write_blank(model_dir)
        self._shared: dict[str, int] = {}               # plan signature -> its shared LoRA id
        self._names_of: dict[int, frozenset[str]] = {}  # shared LoRA id -> the expert names its plan uses
        self._inflight: dict[int, int] = {}             # LoRA id -> requests running with it
        self._doomed: dict[int, str] = {}               # shared id of a removed expert's plan -> that expert
        self._ids = itertools.count(1)
        self._unique = itertools.count(_UNIQUE_BASE)
        self._lock = threading.Lock()

    def _write_blank(self, model_dir: Path) -> None:
        import torch
        from safetensors.torch import save_file
        hidden = int(json.loads((Path(model_dir) / "config.json").read_text())["hidden_size"])
        self._blank.mkdir(parents=True, exist_ok=True)
        key = "base_model.model.model.layers.0.self_attn.o_proj"
        save_file({f"{key}.lora_A.weight": torch.zeros(1, hidden), f"{key}.lora_B.weight": torch.zeros(hidden, 1)},
                  str(self._blank / "adapter_model.safetensors"))
        (self._blank / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["o_proj"], "bias": "none",
            "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir)}))

    def request(self, plan: ExecutionPlan):
        """(LoRARequest, unique) for a plan; None for the base model."""
        from vllm.lora.request import LoRARequest
        if plan.kind in ("base", "moe"):
            return None, False
        unique = plan.kind == "token_mixture"
        with self._lock:
            if unique:
                lora_id = next(self._unique)
            else:
                sig = plan.signature()
                if sig not in self._shared:
                    self._shared[sig] = next(self._ids)
                    self._names_of[self._shared[sig]] = frozenset(r.name for r in plan.experts)
                lora_id = self._shared[sig]
            self._inflight[lora_id] = self._inflight.get(lora_id, 0) + 1
        folder = self.root / str(lora_id)
        if not (folder / PLAN_FILE).exists():
            tmp = self.root / f".{lora_id}.{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                os.link(self._blank / f, tmp / f)
            body = {k: v for k, v in asdict(plan).items() if k not in ("remote", "engine", "fallback")}
            (tmp / PLAN_FILE).write_text(json.dumps(body))
            os.replace(tmp, folder)
        return LoRARequest(lora_name=f"moerge-plan-{lora_id}", lora_int_id=lora_id, lora_path=str(folder)), unique

    def done(self, lora_id: int) -> str | None:
        """A request with this LoRA id ended. If it was the last one on a removed expert's shared plan,
        that expert's name (the plan is to be dropped from the engine now)."""
        with self._lock:
            left = self._inflight.get(lora_id, 0) - 1
            if left > 0:
                self._inflight[lora_id] = left
                return None
            self._inflight.pop(lora_id, None)
            return self._doomed.pop(lora_id, None)

    def forget(self, name: str) -> list[int]:
        """Expert `name` left the pool: no new request gets the shared plans that use it. Returns the
        ones idle now (to drop from the engine); the busy ones come back from `done` when they end."""
        with self._lock:
            ids = []
            for sig, i in list(self._shared.items()):
                if name in self._names_of[i]:
                    del self._shared[sig], self._names_of[i]
                    ids.append(i)
            self._doomed.update((i, name) for i in ids if self._inflight.get(i, 0) > 0)
            return [i for i in ids if self._inflight.get(i, 0) == 0]

    def inflight(self, lora_id: int) -> int:
        with self._lock:
            return self._inflight.get(lora_id, 0)

    def shared_ids(self) -> int:
        with self._lock:
            return len(self._shared)

    def release(self, lora_id: int) -> None:
        """Delete a plan folder that no request will load again (unique, or a dropped shared one)."""
        shutil.rmtree(self.root / str(lora_id), ignore_errors=True)


class EngineUnavailableError(ExpertError):
    """The engine died under a request, or is restarting: the request may be sent again (503)."""

    status = 503
    retry_after = 2


class _LoopQueue:
    """The `put` of a queue.Queue for the engine's loop, delivering into an asyncio.Queue on the caller's loop
    (in order: call_soon_threadsafe keeps FIFO)."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.items: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)


class VllmExecutor:
    name = "vllm"
    kinds = VLLM_KINDS
    restart_backoff_s = (1.0, 2.0, 5.0, 10.0, 30.0)   # between failed restarts; the last one repeats

    def __init__(self, model_dir: Path, *, max_resident_experts: int = 64, max_lora_rank: int = 64,
                 max_num_seqs: int = 64, dtype: str = "auto", kv_cache_gib: int = 2, max_model_len: int = 2048,
                 cpu_threads: str = "auto", onednn_cache: int | None = 16, plan_dir: Path | None = None,
                 prefix_caching: bool = True, start: bool = True):
        self.model_dir = Path(model_dir)
        dtype = resolve_dtype(dtype)     # auto: bf16 only on a CPU with native bf16 (moerge/compute.py)
        self.dtype = dtype
        self.max_lora_rank = max_lora_rank
        self.max_resident_experts = max_resident_experts
        # every request in a full batch may carry its own plan adapter: one vLLM slot each
        self.engine_kwargs = dict(model=str(self.model_dir), tokenizer=str(self.model_dir), dtype=dtype,
                                  enable_lora=True, max_loras=max_num_seqs, max_lora_rank=1,
                                  max_cpu_loras=4 * max_num_seqs, max_num_seqs=max_num_seqs,
                                  max_model_len=max_model_len, enable_prefix_caching=bool(prefix_caching),
                                  worker_extension_cls="moerge.executors.vllm_plugin.MoergeWorkerExtension")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        os.environ["MOERGE_PLUGIN_CAPACITY"] = str(max_resident_experts)
        os.environ["MOERGE_PLUGIN_DTYPE"] = dtype
        if onednn_cache:   # read by the engine's processes when they start (docs/reliability.md, memory):
            # oneDNN's process-wide primitive cache (vLLM's linear layers and torch's both read it) and
            # torch's ideep cache of matmul primitives (the LoRA steps' bf16 matmuls)
            os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(onednn_cache)
            os.environ["LRU_CACHE_CAPACITY"] = str(onednn_cache)
        bind_cpu_threads(cpu_threads)
        self.adapters = PlanAdapters(self.model_dir, plan_dir)
        self._ready = threading.Event()
        self.error: str | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="vllm-engine", daemon=True)
        self.engine = None
        self.tokenizer = None
        self.restarts = 0
        self.failed = False         # the first start failed: nothing will come up
        if start:
            self._thread.start()

    # -- lifecycle --------------------------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except Exception as e:  # noqa: BLE001 - reported on /readyz
            self.error = f"{type(e).__name__}: {e}"
            self.failed = True
            log.exception("vLLM engine failed to start")
            return
        self._ready.set()
        self._loop.create_task(self._supervise())
        self._loop.run_forever()

    async def _supervise(self, every_s: float = 0.5) -> None:
        """Watch the engine process; when it dies, go not-ready (plans fall back, /readyz is 503), shut the
        dead engine down and start a new one, with backoff between failed attempts."""
        while self.engine is not None:
            await asyncio.sleep(every_s)
            engine = self.engine
            if engine is None or not engine.errored:
                continue
            self._ready.clear()
            self.error = "the vLLM engine process died; restarting it"
            log.error("vLLM engine died; restarting it")
            try:
                engine.shutdown()
            except Exception:  # noqa: BLE001 - it is dead already
                log.exception("shutting down the dead vLLM engine")
            attempt = 0
            while True:
                try:
                    await self._start()
                    break
                except Exception as e:  # noqa: BLE001 - reported on /readyz, tried again
                    wait = self.restart_backoff_s[min(attempt, len(self.restart_backoff_s) - 1)]
                    self.error = f"the vLLM engine died and failed to restart ({type(e).__name__}: {e}); " \
                                 f"next attempt in {wait:.0f} s"
                    log.exception("restarting the vLLM engine")
                    attempt += 1
                    await asyncio.sleep(wait)
            self.restarts += 1
            self.error = None
            self._ready.set()
            log.warning("vLLM engine restarted (%d restart(s) so far)", self.restarts)

    async def _start(self) -> None:
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_kwargs))
        await self._after_start()

    async def _after_start(self) -> None:
        """Set-up the worker needs once the model is loaded (the MoE engine's rerouting tables)."""

    def ready(self) -> bool:
        return self._ready.is_set() and self.engine is not None and not self.engine.errored

    def wait_ready(self, timeout: float = 600) -> bool:
        self._ready.wait(timeout)
        if self.failed:     # a restart in progress is waited for, not an error
            raise RuntimeError(f"vLLM engine failed to start: {self.error}")
        return self.ready()

    def caps(self) -> EngineCaps:
        why = (f"the vLLM engine failed to start ({self.error})" if self.failed else
               f"the vLLM engine is not available ({self.error})" if self.error else "the vLLM engine is still starting")
        return EngineCaps(self.name, ready=self.ready(), kinds=self.kinds, max_rank=self.max_lora_rank,
                          max_experts=self.max_resident_experts, not_ready_reason=why)

    def describe(self) -> dict:
        out = {"engine": self.name, "ready": self.ready(), "error": self.error, "restarts": self.restarts,
               "max_resident_experts": self.max_resident_experts, "max_lora_rank": self.max_lora_rank,
               "dtype": self.dtype}
        if self.ready():
            try:
                out.update(self._call(self.engine.collective_rpc("moerge_describe"), 30)[0])
            except Exception as e:  # noqa: BLE001 - state is informative only
                out["describe_error"] = str(e)
        return out

    def shutdown(self) -> None:
        if self.engine is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._ashutdown(), self._loop).result(120)
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _ashutdown(self) -> None:
        engine, self.engine = self.engine, None
        engine.shutdown()

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _on_engine_loop(self, coro) -> asyncio.Future:
        """`coro` run on the engine's loop, awaitable from the caller's loop; cancelling the awaiting task
        cancels the coroutine there, and vLLM aborts a cancelled request."""
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    # -- generation -------------------------------------------------------------------
    def _sampling(self, params: SamplingParams):
        from vllm import SamplingParams as VSP
        return VSP(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                   stop=params.stop or None, seed=params.seed, ignore_eos=params.ignore_eos)

    async def _agenerate(self, prompt_ids: list[int], sp, plan: ExecutionPlan, out_q: queue.Queue | None):
        """(final RequestOutput, layer usage) of one request under its plan."""
        if plan.kind not in self.kinds:
            raise ValueError(f"vLLM does not run {plan.kind} plans (make_plan should not have sent it here)")
        from vllm.v1.engine.exceptions import EngineDeadError
        engine = self.engine
        if engine is None or engine.errored:
            raise EngineUnavailableError("the vLLM engine is restarting; send the request again shortly")
        lora, unique = self.adapters.request(plan)
        final, sent, dead = None, 0, False
        try:
            async for out in engine.generate({"prompt_token_ids": prompt_ids}, sp, uuid.uuid4().hex,
                                                  lora_request=lora):
                final = out
                if out_q is not None:
                    text = out.outputs[0].text
                    if len(text) > sent:
                        out_q.put(("delta", text[sent:]))
                        sent = len(text)
        except EngineDeadError as e:
            dead = True
            raise EngineUnavailableError("the vLLM engine process died during this request; it is being "
                                         "restarted: send the request again shortly") from e
        finally:
            usage = {}
            if lora is not None:
                doomed = self.adapters.done(lora.lora_int_id)
                if unique and not dead:
                    res = await engine.collective_rpc("moerge_finish_plan", args=(lora.lora_int_id,))
                    usage = {int(k): v for k, v in (res[0] if res else {}).items()}
                elif plan.kind == "esft" and not dead and doomed is None and self.adapters.inflight(lora.lora_int_id) == 0:
                    # its last request ended: the adapter stays resident but becomes evictable (the next
                    # request's plan adapter registers it again, without reloading its experts)
                    await engine.collective_rpc("moerge_finish_plan", args=(lora.lora_int_id,))
                if unique:
                    self.adapters.release(lora.lora_int_id)
                if doomed is not None and not dead:
                    await self._drop_plans(engine, [lora.lora_int_id], doomed)
        return final, usage

    async def _drop_plans(self, engine, lora_ids: list[int], name: str | None) -> None:
        """Drop shared plans of removed experts from the worker (and vLLM's adapter cache), and the
        resident versions of expert `name`; then delete their folders."""
        try:
            await engine.collective_rpc("moerge_forget", args=(lora_ids, name))
        except Exception:  # noqa: BLE001 - a dead engine forgets everything anyway
            log.warning("forgetting %s in the vLLM worker failed", name or lora_ids, exc_info=True)
        for i in lora_ids:
            self.adapters.release(i)

    def forget(self, name: str) -> None:
        """Expert `name` was removed from the pool: its resident weights and the plans that use it leave
        the engine (now, or when their last request ends). Returns at once; the worker does it between steps."""
        idle = self.adapters.forget(name)
        engine = self.engine
        if engine is None or not self._loop.is_running():
            for i in idle:
                self.adapters.release(i)
            return
        asyncio.run_coroutine_threadsafe(self._drop_plans(engine, idle, name), self._loop)

    def generate_many(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                      plans: list[ExecutionPlan]) -> list[Generation]:
        """Submit every request at once (vLLM batches them, plans mixed); params: one, or one per prompt."""
        if len(prompts) != len(plans):
            raise ValueError("one plan per prompt")
        per = params if isinstance(params, list) else [params] * len(prompts)
        sps = [self._sampling(p) for p in per]

        async def run():
            return await asyncio.gather(*[self._agenerate(p, sp, plan, None)
                                          for p, sp, plan in zip(prompts, sps, plans)])

        return [_generation(out, len(p), usage) for p, (out, usage) in zip(prompts, self._call(run()))]

    def generate_tokens(self, prompt_ids: list[int], params: SamplingParams, plan: ExecutionPlan) -> Generation:
        out, usage = self._call(self._agenerate(prompt_ids, self._sampling(params), plan, None))
        return _generation(out, len(prompt_ids), usage)

    def generate(self, messages: list[dict], params: SamplingParams, plan: ExecutionPlan) -> Generation:
        return self.generate_tokens(encode_chat(self.tokenizer, messages), params, plan)

    def complete(self, messages: list[dict], max_tokens: int) -> str:
        """Greedy text for `messages` on the base model (the GLIDER instruction writer uses this)."""
        return self.generate(messages, SamplingParams(max_tokens=max_tokens), ExecutionPlan("base")).text

    def stream(self, messages: list[dict], params: SamplingParams, plan: ExecutionPlan) -> Iterator[StreamDelta]:
        prompt = encode_chat(self.tokenizer, messages)
        q: queue.Queue = queue.Queue()
        fut = asyncio.run_coroutine_threadsafe(self._agenerate(prompt, self._sampling(params), plan, q), self._loop)
        fut.add_done_callback(lambda f: q.put(("done", None)))
        while True:
            kind, value = q.get()
            if kind == "delta":
                yield StreamDelta(text=value)
            else:
                break
        out, usage = fut.result()
        g = _generation(out, len(prompt), usage)
        yield StreamDelta("", g.finish_reason, g.prompt_tokens, g.completion_tokens, layer_usage=usage,
                          cached_tokens=g.cached_tokens)


    # -- generation from another event loop (the server's): no thread held while the engine works ----------
    async def agenerate(self, messages: list[dict], params: SamplingParams, plan: ExecutionPlan) -> Generation:
        prompt = encode_chat(self.tokenizer, messages)
        out, usage = await self._on_engine_loop(self._agenerate(prompt, self._sampling(params), plan, None))
        return _generation(out, len(prompt), usage)

    async def astream(self, messages: list[dict], params: SamplingParams, plan: ExecutionPlan
                      ) -> AsyncIterator[StreamDelta]:
        """Deltas as vLLM makes them; closing the generator (a client gone) aborts the engine request."""
        prompt = encode_chat(self.tokenizer, messages)
        q = _LoopQueue()
        fut = self._on_engine_loop(self._agenerate(prompt, self._sampling(params), plan, q))
        fut.add_done_callback(lambda f: q.items.put_nowait(("done", None)))
        try:
            while True:
                kind, value = await q.items.get()
                if kind != "delta":
                    break
                yield StreamDelta(text=value)
            out, usage = await fut
        finally:
            if not fut.done():
                fut.cancel()
        g = _generation(out, len(prompt), usage)
        yield StreamDelta("", g.finish_reason, g.prompt_tokens, g.completion_tokens, layer_usage=usage,
                          cached_tokens=g.cached_tokens)


def _generation(out, n_prompt: int, usage: dict) -> Generation:
    o = out.outputs[0]
    return Generation(o.text, n_prompt, len(o.token_ids), "length" if o.finish_reason == "length" else "stop",
                      layer_usage=usage, token_ids=list(o.token_ids), cached_tokens=int(out.num_cached_tokens or 0))


class VllmMoeExecutor(VllmExecutor):
    """The shared MoE base in its own vLLM engine: the bare MoE base (`moe` plans) and ESFT adapters over it
    (`esft` plans) in one batch, through rerouting inside the fused MoE layers (vllm_moe.py)."""

    name = "vllm-moe"
    kinds = frozenset({"moe", "esft"})

    def __init__(self, model_dir: Path, *, adapter_rows: int = 16, max_adapters: int = 8, **kwargs):
        self.adapter_rows, self.max_adapters = int(adapter_rows), int(max_adapters)
        self.moe_state: dict = {}
        self._widest: dict[str, int] = {}      # ESFT adapter key -> its most experts in one layer
        manifest = Path(model_dir) / "moerge_moe.json"
        # the MoE base's version: generations cached for a `moe` plan are only reused on the same base
        self.cache_salt = "@" + json.loads(manifest.read_text())["version"][:16] if manifest.exists() else ""
        super().__init__(model_dir, **kwargs)

    async def _after_start(self) -> None:
        self.moe_state = (await self.engine.collective_rpc("moerge_moe_setup",
                                                           args=(self.adapter_rows, self.max_adapters)))[0]

    admit_timeout_s = 120.0

    async def _agenerate(self, prompt_ids: list[int], sp, plan: ExecutionPlan, out_q: queue.Queue | None):
        """ESFT requests are admitted so that the worker never needs more adapters at once than it has
        slots: a request for an adapter not already running waits (bounded) while `max_adapters` others
        run. An adapter with more experts in a layer than the engine has rows is refused up front."""
        if plan.kind != "esft":
            return await super()._agenerate(prompt_ids, sp, plan, out_q)
        key = plan.experts[0].key
        self._check_fits(plan.experts[0])
        if not hasattr(self, "_running"):
            self._running: dict[str, int] = {}
            self._admission = asyncio.Condition()
        async with self._admission:
            try:
                await asyncio.wait_for(self._admission.wait_for(
                    lambda: key in self._running or len(self._running) < self.max_adapters), self.admit_timeout_s)
            except asyncio.TimeoutError:
                raise EngineUnavailableError(f"all {self.max_adapters} ESFT adapter slots of the MoE engine stayed "
                                             "busy: send the request again shortly, or raise moe_max_adapters") from None
            self._running[key] = self._running.get(key, 0) + 1
        try:
            return await super()._agenerate(prompt_ids, sp, plan, out_q)
        finally:
            async with self._admission:
                self._running[key] -= 1
                if not self._running[key]:
                    del self._running[key]
                self._admission.notify_all()

    def _check_fits(self, ref) -> None:
        widest = self._widest
        if ref.key not in widest:
            per_layer = json.loads((Path(ref.adapter_dir) / "esft_config.json").read_text())["experts"]
            widest[ref.key] = max((len(ids) for ids in per_layer.values()), default=0)
        most = widest[ref.key]
        if most > self.adapter_rows:
            raise PlanError(f"ESFT expert {ref.name!r} replaces {most} experts in one layer, more than the "
                            f"{self.adapter_rows} adapter rows the MoE engine keeps per layer: raise moe_adapter_rows")
