"""vLLM executor: one AsyncLLM engine with LoRA enabled, started once in the background.

Base plans and single-adapter plans become vLLM requests (adapters are LoRARequests, loaded
on first use, so an expert registered at run time is usable at once), and requests for
different experts share a batch. Plans vLLM cannot run (token-level mixtures, TIES, an
adapter above the engine's max rank) and requests that arrive before the engine is ready
go to the reference executor; the routing info says which executor answered.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from moerge.config import cpu_core_list
from moerge.executors.base import Generation, SamplingParams, StreamDelta

log = logging.getLogger("moerge.vllm")


def vllm_target(decision, pool, max_lora_rank: int) -> tuple[str | None, str]:
    """What vLLM runs for a routing decision: (None, "") the base model, (name, "") one LoRA
    adapter, or (None, why not) for plans it cannot run (they go to the reference engine)."""
    d = decision
    if d is None or d.abstained or not d.chosen:
        return None, ""
    if d.granularity != "sequence" or len(d.chosen) != 1:
        return None, f"{d.granularity}-level plans run in the reference engine"
    card = pool.get(d.chosen[0])
    if card.kind != "lora":
        return None, f"{card.kind} experts do not run in vLLM"
    if (card.rank or 0) > max_lora_rank:
        return None, f"rank {card.rank} is above the engine's max_lora_rank {max_lora_rank}"
    return card.name, ""


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


class VllmExecutor:
    name = "vllm"

    def __init__(self, model_dir: Path, pool, fallback=None, *, max_loras: int = 12, max_lora_rank: int = 16,
                 max_num_seqs: int = 64, dtype: str = "bfloat16", kv_cache_gib: int = 2, max_model_len: int = 2048,
                 cpu_threads: str = "auto", start: bool = True):
        self.model_dir = Path(model_dir)
        self.pool = pool
        self.fallback = fallback
        self.max_lora_rank = max_lora_rank
        self.engine_kwargs = dict(model=str(self.model_dir), tokenizer=str(self.model_dir), dtype=dtype,
                                  enable_lora=True, max_loras=max_loras, max_lora_rank=max_lora_rank,
                                  max_cpu_loras=max(64, max_loras), max_num_seqs=max_num_seqs,
                                  max_model_len=max_model_len, enable_prefix_caching=False)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        bind_cpu_threads(cpu_threads)
        self._ids: dict[tuple[str, str], int] = {}
        self._id_counter = itertools.count(1)
        self._ready = threading.Event()
        self.error: str | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="vllm-engine", daemon=True)
        self.engine = None
        self.tokenizer = None
        if start:
            self._thread.start()

    # -- lifecycle --------------------------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except Exception as e:  # noqa: BLE001 - reported on /readyz
            self.error = f"{type(e).__name__}: {e}"
            log.exception("vLLM engine failed to start")
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_kwargs))

    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float = 600) -> bool:
        self._ready.wait(timeout)
        if self.error:
            raise RuntimeError(f"vLLM engine failed to start: {self.error}")
        return self.ready()

    def shutdown(self) -> None:
        if self.engine is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._ashutdown(), self._loop).result(120)
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _ashutdown(self) -> None:
        engine, self.engine = self.engine, None
        engine.shutdown()

    # -- plans ----------------------------------------------------------------------
    def lora_request(self, name: str):
        from vllm.lora.request import LoRARequest
        card = self.pool.get(name)
        key = (name, card.artifacts["adapter_weights"])
        if key not in self._ids:
            self._ids[key] = next(self._id_counter)
        return LoRARequest(lora_name=f"{name}@{key[1][:12]}", lora_int_id=self._ids[key],
                           lora_path=str(self.pool.adapter_dir(card)))

    def _route(self, plan) -> str | None:
        """"base", an adapter name, or None when the plan goes to the fallback (reason recorded)."""
        d = plan.decision if plan is not None else None
        adapter, why = (vllm_target(d, self.pool, self.max_lora_rank) if self.ready()
                        else (None, "vLLM engine still starting"))
        if why:
            if self.fallback is None:
                raise RuntimeError(why)
            if d is not None:
                d.detail["executor"] = self.fallback.name
                d.detail["executor_reason"] = why
            return None
        if d is not None:
            d.detail["executor"] = "vllm"
        return adapter or "base"

    def _sampling(self, params: SamplingParams):
        from vllm import SamplingParams as VSP
        return VSP(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                   stop=params.stop or None, seed=params.seed, ignore_eos=params.ignore_eos)

    def _prompt(self, messages: list[dict]) -> dict:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
        return {"prompt_token_ids": list(ids)}

    # -- generation -------------------------------------------------------------------
    async def _agenerate(self, prompt: dict, sp, lora, out_q: queue.Queue | None):
        final = None
        sent = 0
        async for out in self.engine.generate(prompt, sp, uuid.uuid4().hex, lora_request=lora):
            final = out
            if out_q is not None:
                text = out.outputs[0].text
                if len(text) > sent:
                    out_q.put(("delta", text[sent:]))
                    sent = len(text)
        return final

    def generate_tokens(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None):
        """Run one request by token ids (benchmarks use this to bypass the service)."""
        lora = self.lora_request(adapter) if adapter else None
        fut = asyncio.run_coroutine_threadsafe(
            self._agenerate({"prompt_token_ids": prompt_ids}, self._sampling(params), lora, None), self._loop)
        return fut.result()

    def generate_many(self, prompts: list[list[int]], params: SamplingParams,
                      adapters: list[str | None]) -> list[tuple[str, list[int]]]:
        """Submit every request at once (vLLM batches them, adapters mixed); (text, token ids) each."""
        if len(prompts) != len(adapters):
            raise ValueError("one adapter (or None) per prompt")
        sp = self._sampling(params)

        async def run():
            return await asyncio.gather(*[
                self._agenerate({"prompt_token_ids": p}, sp, self.lora_request(a) if a else None, None)
                for p, a in zip(prompts, adapters)])

        outs = asyncio.run_coroutine_threadsafe(run(), self._loop).result()
        return [(o.outputs[0].text, list(o.outputs[0].token_ids)) for o in outs]

    def generate(self, messages: list[dict], params: SamplingParams, plan=None) -> Generation:
        target = self._route(plan)
        if target is None:
            return self.fallback.generate(messages, params, plan)
        lora = None if target == "base" else self.lora_request(target)
        prompt = self._prompt(messages)
        fut = asyncio.run_coroutine_threadsafe(self._agenerate(prompt, self._sampling(params), lora, None), self._loop)
        out = fut.result()
        o = out.outputs[0]
        return Generation(o.text, len(prompt["prompt_token_ids"]), len(o.token_ids),
                          "length" if o.finish_reason == "length" else "stop")

    def stream(self, messages: list[dict], params: SamplingParams, plan=None) -> Iterator[StreamDelta]:
        target = self._route(plan)
        if target is None:
            yield from self.fallback.stream(messages, params, plan)
            return
        lora = None if target == "base" else self.lora_request(target)
        prompt = self._prompt(messages)
        q: queue.Queue = queue.Queue()
        fut = asyncio.run_coroutine_threadsafe(self._agenerate(prompt, self._sampling(params), lora, q), self._loop)
        fut.add_done_callback(lambda f: q.put(("done", None)))
        while True:
            kind, value = q.get()
            if kind == "delta":
                yield StreamDelta(text=value)
            else:
                break
        out = fut.result()
        o = out.outputs[0]
        yield StreamDelta("", "length" if o.finish_reason == "length" else "stop",
                          len(prompt["prompt_token_ids"]), len(o.token_ids))
