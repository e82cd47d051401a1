"""vLLM general plugin (entry point `vllm.general_plugins`): loads in every vLLM process.

It swaps the CPU punica wrapper for moerge's grouped one unless MOERGE_VLLM_PUNICA=vllm.
"""

from __future__ import annotations

import os


def register() -> None:
    if os.environ.get("MOERGE_VLLM_PUNICA", "grouped") != "grouped":
        return
    try:
        from vllm.platforms.cpu import CpuPlatform
    except ImportError:  # pragma: no cover - not a CPU build
        return
    CpuPlatform.get_punica_wrapper = classmethod(lambda cls: "moerge.executors.vllm_punica.GroupedPunicaCPU")
