"""An expert as an engine holds it: per module its A, s·B and its gate vectors prepared for gating,
read from the files an `ExpertRef` names (safetensors only, never a pickle).

Both engines use this, so the reference engine and the vLLM plugin apply the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moerge.experts.lora import LORA_KEY_RE, lora_scaling, read_safetensors
from moerge.kernels.gating import standardise
from moerge.plan import ExpertRef, PlanError

# the gating mode each gate set is prepared for (PHATGOOSE standardises, Arrow normalises)
GATE_MODES = {"arrow": "arrow", "gate": "phatgoose"}


@dataclass
class LoadedExpert:
    ref: ExpertRef
    a: dict[str, torch.Tensor]                 # module -> A [r, d_in], float32
    sb: dict[str, torch.Tensor]                # module -> s·B [d_out, r], float32
    gates: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # gate set -> module -> [d_in]

    def rank(self, module: str) -> int:
        return self.a[module].shape[0] if module in self.a else 0


def prepare_gate(v: torch.Tensor, gate_set: str) -> torch.Tensor:
    v = v.float()
    return standardise(v) if GATE_MODES.get(gate_set) == "phatgoose" else v / v.norm().clamp_min(1e-12)


def load_expert(ref: ExpertRef) -> LoadedExpert:
    """Read one expert from its files. Not cached here: each engine keeps its resident experts, up to
    its capacity, and drops the versions the pool removed (a process-wide cache kept up to 256 of them,
    removed experts included, and was a large part of an engine's memory under churn)."""
    folder = Path(ref.adapter_dir)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = read_safetensors(folder / "adapter_model.safetensors")
    except (OSError, ValueError) as e:
        raise PlanError(f"expert {ref.name!r}: its adapter files cannot be read ({e}); re-register it") from e
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = LORA_KEY_RE.match(key)
        if m:
            pairs.setdefault(m["module"], {})[m["which"]] = t
    a, sb = {}, {}
    for module, ab in pairs.items():
        r = ab["A"].shape[0]
        a[module] = ab["A"].float().contiguous()
        sb[module] = (ab["B"].float() * lora_scaling(config, module, r)).contiguous()
    gates = {}
    for gate_set, path in ref.gates:
        raw = read_safetensors(path)
        gates[gate_set] = {m: prepare_gate(v, gate_set) for m, v in raw.items()}
    return LoadedExpert(ref, a, sb, gates)
