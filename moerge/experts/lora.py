"""Read and validate a peft LoRA adapter folder against the base model, without unpickling.

A valid adapter becomes a `LoraAdapter`: per adapted module (full dotted name in the base
model, e.g. `model.layers.3.self_attn.q_proj`) the A [r, d_in] and B [d_out, r] matrices and
the scaling s, so that the module computes y = W x + s · B A x.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from moerge.experts.errors import (
    AdapterConfigError,
    AdapterWeightsError,
    NonFiniteWeightsError,
    RankError,
    ShapeMismatchError,
    TargetModuleError,
    UnsafeFormatError,
    UploadTooLargeError,
    WrongBaseModelError,
)

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"}
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LORA_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


@dataclass(frozen=True)
class BaseModelSpec:
    """What validation needs to know about the base: its names and its linear modules' shapes."""

    model_id: str
    aliases: frozenset[str]
    linear_shapes: dict[str, tuple[int, int]]  # module name -> (d_out, d_in)

    def short_names(self) -> set[str]:
        return {n.rsplit(".", 1)[-1] for n in self.linear_shapes}


@lru_cache(maxsize=4)
def base_spec_from_folder(folder: str, model_id: str) -> BaseModelSpec:
    """Shapes from config.json alone: the model is built on the meta device, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: (m.out_features, m.in_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    aliases = {model_id, model_id.rsplit("/", 1)[-1], str(Path(folder)), Path(folder).name}
    return BaseModelSpec(model_id=model_id, aliases=frozenset(a.lower() for a in aliases),
                         linear_shapes=shapes)


@dataclass
class LoraAdapter:
    config: dict
    rank: int
    target_modules: list[str]  # short names, e.g. ["q_proj", "v_proj"]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)  # module -> (A, B)
    scaling: dict[str, float] = field(default_factory=dict)

    def delta(self, module: str) -> torch.Tensor:
        """s · B A for one module, [d_out, d_in], float32."""
        a, b = self.weights[module]
        return self.scaling[module] * (b.float() @ a.float())


def check_sizes(folder: Path, max_bytes: int) -> None:
    for p in folder.rglob("*"):
        if p.is_file() and p.stat().st_size > max_bytes:
            raise UploadTooLargeError(
                f"{p.name} is {p.stat().st_size / 2**20:.1f} MiB, over the limit of "
                f"{max_bytes / 2**20:.1f} MiB: raise MOERGE_MAX_UPLOAD_MB or upload a smaller adapter")


def read_adapter_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise AdapterConfigError(f"{folder} has no {CONFIG_NAME}: point at a folder saved by "
                                 "peft's save_pretrained")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterConfigError(f"{CONFIG_NAME} is not valid JSON ({e}): re-save the adapter with peft")
    if not isinstance(config, dict):
        raise AdapterConfigError(f"{CONFIG_NAME} must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterConfigError(f"{CONFIG_NAME} says peft_type={peft_type}; only LORA adapters are served")
    if config.get("use_dora"):
        raise AdapterConfigError("DoRA adapters are not supported: train a plain LoRA (use_dora=False)")
    return config


def _check_base(config: dict, spec: BaseModelSpec) -> None:
    base = config.get("base_model_name_or_path")
    if not base:
        return  # peft leaves it empty when the base had no name; shapes still decide
    base_l = str(base).lower().rstrip("/")
    if base_l in spec.aliases or base_l.rsplit("/", 1)[-1] in spec.aliases:
        return
    raise WrongBaseModelError(
        f"adapter was trained on '{base}', but this pool serves '{spec.model_id}': "
        f"train the adapter on {spec.model_id}")


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, read with pread(2) into fresh memory.

    Not safetensors' default mmap backend: in safetensors 0.8.0 each mmap-backed load keeps about
    110 bytes of Python objects per tensor alive for good (23 KiB for a bundled adapter's 210
    tensors, measured with tracemalloc; safetensors issue #369 reports the same). A service that
    registers experts for months would grow by that much with every registration."""
    from safetensors.torch import load_file
    return load_file(str(path), backend="pread")


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeFormatError(
                f"{', '.join(pickles)} is a pickle-based format, which moerge never loads: "
                f"convert it to {WEIGHTS_NAME} (peft: save_pretrained(..., safe_serialization=True))")
        raise AdapterWeightsError(f"{folder} has no {WEIGHTS_NAME}: save the adapter with peft")
    from safetensors import SafetensorError
    try:
        return read_safetensors(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterWeightsError(f"{WEIGHTS_NAME} is not a readable safetensors file ({e}): re-save the adapter "
                                  "with peft's save_pretrained(..., safe_serialization=True)")


def _targets(config: dict) -> list[str] | str:
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return targets
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        return targets
    raise AdapterConfigError(f"{CONFIG_NAME} has no usable target_modules list")


def lora_scaling(config: dict, module: str, rank: int) -> float:
    """peft's s for one module: lora_alpha (or its alpha_pattern match) over r, or over √r with rsLoRA."""
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(pattern, module):
            alpha = float(value)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def load_lora(folder: Path, spec: BaseModelSpec, *, max_rank: int = 256,
              max_bytes: int | None = None) -> LoraAdapter:
    """Validate an adapter folder against the base; raise a typed ExpertError on any problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterConfigError(f"{folder} is not a folder: pass the folder peft's save_pretrained wrote")
    if max_bytes is not None:
        check_sizes(folder, max_bytes)
    config = read_adapter_config(folder)
    _check_base(config, spec)
    targets = _targets(config)
    r = config.get("r")
    if not isinstance(r, int) or not 1 <= r <= max_rank:
        raise RankError(f"LoRA rank r={r!r} is out of range: moerge serves ranks 1..{max_rank}; retrain the "
                        "adapter with a rank in that range (or raise MOERGE_MAX_LORA_RANK)")
    if isinstance(targets, list):
        missing = sorted(set(targets) - spec.short_names() - set(spec.linear_shapes))
        if missing:
            raise TargetModuleError(
                f"target modules {missing} do not exist in {spec.model_id}: train the adapter with "
                f"target_modules from {sorted(spec.short_names())}")
    tensors = _load_weights(folder)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = LORA_KEY_RE.match(key)
        if not m:
            raise AdapterWeightsError(f"tensor '{key}' is not a LoRA A/B matrix: moerge serves plain "
                                      "LoRA on linear layers (no modules_to_save, no embedding LoRA)")
        pairs.setdefault(m["module"], {})[m["which"]] = t
    if not pairs:
        raise AdapterWeightsError(f"{WEIGHTS_NAME} holds no LoRA tensors")
    weights, scaling = {}, {}
    for module, ab in sorted(pairs.items()):
        if module not in spec.linear_shapes:
            raise TargetModuleError(f"'{module}' is not a linear module of {spec.model_id}")
        if set(ab) != {"A", "B"}:
            raise AdapterWeightsError(f"'{module}' has lora_{'A' if 'A' not in ab else 'B'} missing")
        a, b = ab["A"], ab["B"]
        d_out, d_in = spec.linear_shapes[module]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
            raise ShapeMismatchError(
                f"'{module}': A {tuple(a.shape)} and B {tuple(b.shape)} do not fit the base module "
                f"[{d_out} x {d_in}]: the adapter was made for a model of another size; train it on {spec.model_id}")
        if not 1 <= a.shape[0] <= max_rank:
            raise RankError(f"'{module}' has rank {a.shape[0]}, outside 1..{max_rank}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise NonFiniteWeightsError(f"'{module}' holds NaN or Inf values: the adapter is corrupt "
                                        "or its training diverged; retrain it")
        weights[module] = (a, b)
        scaling[module] = lora_scaling(config, module, a.shape[0])
    short = sorted({m.rsplit(".", 1)[-1] for m in weights})
    return LoraAdapter(config=config, rank=r, target_modules=short, weights=weights, scaling=scaling)
