"""vLLM general plugin (entry point `vllm.general_plugins`): loads in every vLLM process.

It installs moerge's CPU punica wrapper (vllm_punica.py), names every LoRA-wrapped module for it,
and reads the moerge plan that a plan adapter's folder carries when vLLM loads that adapter
(vllm_plans.py). `MoergeWorkerExtension` adds the calls the executor makes into the worker.
MOERGE_VLLM_PUNICA=vllm keeps vLLM's own CPU LoRA ops (for benchmarks only: plans need moerge's).
"""

from __future__ import annotations

import os

_PATCHED = False


def register() -> None:
    global _PATCHED
    if _PATCHED or os.environ.get("MOERGE_VLLM_PUNICA", "moerge") == "vllm":
        return
    try:
        from vllm.platforms.cpu import CpuPlatform
    except ImportError:  # pragma: no cover - not a CPU build
        return
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.worker_manager import WorkerLoRAManager

    CpuPlatform.get_punica_wrapper = classmethod(lambda cls: "moerge.executors.vllm_punica.MoergePunicaCPU")
    # vLLM's LoRA inside fused MoE runs Triton GPU kernels; on CPU an MoE layer keeps vLLM's CPU kernel and
    # moerge adapts MoE experts as ESFT adapters through rerouting (vllm_moe.py)
    from vllm.lora.layers import fused_moe as lora_moe
    from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig
    for cls in (lora_moe.FusedMoEWithLoRA, lora_moe.FusedMoE3DWithLoRA):
        cls.can_replace_layer = classmethod(lambda cls, *args, **kwargs: False)
    original_post_init = FusedMoEConfig.__post_init__

    def post_init(self):   # enabling LoRA would pick the Triton experts for every MoE layer
        self.is_lora_enabled = False
        original_post_init(self)

    FusedMoEConfig.__post_init__ = post_init

    original_register = LoRAModelManager.register_module

    def register_module(self, module_name, module):
        original_register(self, module_name, module)
        from moerge.executors.vllm_plans import STATE
        STATE.register_module(module_name, module)

    original_load = WorkerLoRAManager._load_adapter

    def load_adapter(self, lora_request):
        from moerge.executors.vllm_plans import STATE
        STATE.register_plan_folder(lora_request.lora_int_id, lora_request.lora_path)
        return original_load(self, lora_request)

    LoRAModelManager.register_module = register_module
    WorkerLoRAManager._load_adapter = load_adapter
    _PATCHED = True


class MoergeWorkerExtension:
    """Methods vLLM adds to its worker (`worker_extension_cls`), called through collective_rpc."""

    def moerge_finish_plan(self, lora_id: int) -> dict:
        """A finished request's per-layer usage; its plan and its vLLM adapter are dropped."""
        from moerge.executors.vllm_moe import MOE
        from moerge.executors.vllm_plans import STATE
        plan = STATE.drop_plan(lora_id)
        MOE.drop_plan(lora_id)
        try:
            self.remove_lora(lora_id)
        except Exception:  # noqa: BLE001 - already evicted by vLLM's own LRU
            pass
        return {str(k): v for k, v in plan.layer_usage().items()} if plan is not None else {}

    def moerge_forget(self, lora_ids: list[int], name: str | None) -> dict:
        """Shared plans whose expert was removed, and that expert's resident versions, leave this worker;
        then free heap pages go back to the system."""
        from moerge.executors.memory import malloc_trim
        from moerge.executors.vllm_plans import STATE
        from moerge.executors.vllm_moe import MOE
        dropped = STATE.forget(lora_ids, name)
        dropped["esft_adapters"] = MOE.forget(lora_ids, name)
        for i in lora_ids:
            try:
                self.remove_lora(i)
            except Exception:  # noqa: BLE001 - vLLM's own LRU may have evicted it already
                pass
        malloc_trim()
        return dropped

    def moerge_set_capacity(self, capacity: int, dtype: str) -> None:
        import torch

        from moerge.executors.vllm_plans import STATE
        STATE.capacity = capacity
        STATE.dtype = getattr(torch, dtype)

    def moerge_memory(self, trim: bool = False) -> dict:
        """This worker's resident memory (MiB): all of it and its main heap; with trim=True, measured
        again after glibc's malloc_trim(0) hands free heap pages back to the system."""
        from moerge.executors.memory import malloc_trim, rss_breakdown
        out = {"before": rss_breakdown()}
        if trim:
            out["trimmed"] = malloc_trim()
            out["after"] = rss_breakdown()
        return out

    def moerge_describe(self) -> dict:
        from moerge.executors.vllm_moe import MOE
        from moerge.executors.vllm_plans import STATE
        out = STATE.describe()
        if MOE.enabled:
            out["moe"] = MOE.describe()
        return out

    def moerge_moe_setup(self, rows: int, max_adapters: int) -> dict:
        """Serve the loaded MoE base with ESFT adapters: extend its expert tables, install rerouting."""
        from moerge.executors.vllm_moe import MOE
        return MOE.setup(self.model_runner.model, rows, max_adapters)
