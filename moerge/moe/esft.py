"""ESFT adapters over an MoE base: which experts a task selects, the adapter folder, and its validation.

An ESFT adapter (Expert-Specialized Fine-Tuning, Wang et al. 2024) replaces a few experts of the
base in place: per layer, the experts with the highest routing affinity to the task, chosen until
their cumulative affinity reaches p. The folder holds `esft_config.json` (the base's version, the
layer -> expert ids map, how they were chosen and trained) and `esft_model.safetensors` with the
selected experts' full MLP weights in the checkpoint's Mixtral names. Training lives in
`moerge.moe.esft_train`; this file never loads a model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moerge.experts.errors import (
    AdapterConfigError,
    AdapterWeightsError,
    NonFiniteWeightsError,
    ShapeMismatchError,
    UnsafeFormatError,
    WrongBaseModelError,
)
from moerge.experts.lora import PICKLE_SUFFIXES, check_sizes, read_safetensors
from moerge.moe.base import MANIFEST, WEIGHTS, MoeBase

FORMAT = "moerge-esft/1"
CONFIG_NAME = "esft_config.json"
WEIGHTS_NAME = "esft_model.safetensors"
PROJ = ("w1", "w3", "w2")      # gate_proj [I, H], up_proj [I, H], down_proj [H, I]
# ESFT's thresholds (paper §3.2, repo README): gate score p = 0.1, token selection ratio p = 0.2
DEFAULT_THRESHOLD = {"gate": 0.1, "token": 0.2}
METRICS = tuple(DEFAULT_THRESHOLD)


def select_experts(affinity: torch.Tensor, threshold: float, max_per_layer: int | None = None) -> dict[int, list[int]]:
    """ESFT's rule on `affinity` [L, M] (each row sums to 1): per layer, take experts in order of
    affinity (ties: the lower id first) until the taken ones' sum reaches `threshold`, at most
    `max_per_layer`. Every layer gets at least one expert. Returns {layer: sorted expert ids}."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold {threshold} is outside (0, 1]")
    if max_per_layer is not None and max_per_layer < 1:
        raise ValueError(f"max_per_layer {max_per_layer} must be at least 1")
    out = {}
    for layer, row in enumerate(affinity.double().tolist()):
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))
        chosen: list[int] = []
        total = 0.0
        for e in order:
            if total >= threshold - 1e-12 or (max_per_layer is not None and len(chosen) >= max_per_layer):
                break
            chosen.append(e)
            total += row[e]
        out[layer] = sorted(chosen)
    return out


def expert_key(layer: int, expert: int, proj: str) -> str:
    return f"layers.{layer}.experts.{expert}.{proj}.weight"


def checkpoint_key(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight"


def expert_shapes(base: MoeBase) -> dict[str, tuple[int, int]]:
    return {"w1": (base.intermediate, base.hidden), "w3": (base.intermediate, base.hidden),
            "w2": (base.hidden, base.intermediate)}


def adapter_bytes(base: MoeBase, experts: dict[int, list[int]]) -> int:
    """What the selected experts weigh in bf16 (the safetensors header aside)."""
    return 2 * 3 * base.hidden * base.intermediate * sum(len(ids) for ids in experts.values())


@dataclass
class EsftAdapter:
    config: dict
    experts: dict[int, list[int]]                                   # layer -> sorted expert ids
    tensors: dict[str, torch.Tensor] = field(repr=False)            # expert_key(...) -> [I, H] / [H, I]

    @property
    def n_experts(self) -> int:
        return sum(len(ids) for ids in self.experts.values())


def save_esft(out: Path, base: MoeBase, experts: dict[int, list[int]], tensors: dict[str, torch.Tensor],
              *, task: str = "", selection: dict | None = None, training: dict | None = None) -> Path:
    """Write the adapter folder (bf16 weights, sorted keys); `tensors` must hold exactly the selected experts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    bf16 = {k: tensors[k].detach().to(torch.bfloat16).contiguous() for k in sorted(tensors)}
    save_file(bf16, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {"format": FORMAT, "base_moe": base.version,
              "experts": {str(layer): sorted(ids) for layer, ids in sorted(experts.items()) if ids},
              "task": task, "selection": selection or {}, "training": training or {}}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise AdapterConfigError(f"{folder} has no {CONFIG_NAME}: point at a folder `moerge experts build-esft` wrote")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterConfigError(f"{CONFIG_NAME} is not valid JSON ({e}): rebuild the adapter with "
                                 "`moerge experts build-esft`") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise AdapterConfigError(f"{CONFIG_NAME} must be a JSON object with \"format\": \"{FORMAT}\"")
    return config


def _check_base(config: dict, base: MoeBase) -> None:
    version = config.get("base_moe")
    if version != base.version:
        raise WrongBaseModelError(
            f"the ESFT adapter was trained on MoE base {str(version)[:16]!r}, but this pool's MoE base is "
            f"{base.id}: train it again on the current base with `moerge experts build-esft`")


def _experts_map(config: dict, base: MoeBase) -> dict[int, list[int]]:
    raw = config.get("experts")
    if not isinstance(raw, dict) or not raw:
        raise AdapterConfigError(f"{CONFIG_NAME} needs \"experts\": a non-empty object of layer -> expert ids")
    out: dict[int, list[int]] = {}
    for key, ids in raw.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < base.n_layers):
            raise ShapeMismatchError(f"ESFT layer {key!r} does not exist: the MoE base {base.id} has layers "
                                     f"0..{base.n_layers - 1}; train the adapter on this base")
        if not isinstance(ids, list) or not ids or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
            raise AdapterConfigError(f"layer {key}: expert ids must be a non-empty list of integers")
        bad = [e for e in ids if not 0 <= e < base.n_experts]
        if bad:
            raise ShapeMismatchError(f"layer {key}: expert ids {bad} are out of range: the MoE base {base.id} has "
                                     f"experts 0..{base.n_experts - 1}; train the adapter on this base")
        if len(set(ids)) != len(ids):
            raise AdapterConfigError(f"layer {key}: expert ids {ids} name an expert twice: list each once")
        out[int(key)] = sorted(ids)
    return dict(sorted(out.items()))


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeFormatError(f"{', '.join(pickles)} is a pickle-based format, which moerge never loads: "
                                f"remove it and keep only {CONFIG_NAME} and {WEIGHTS_NAME}")
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterWeightsError(f"{folder} has no {WEIGHTS_NAME}: save the adapter with `moerge experts build-esft`")
    from safetensors import SafetensorError
    try:
        return read_safetensors(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterWeightsError(f"{WEIGHTS_NAME} is not a readable safetensors file ({e}): rebuild the "
                                  "adapter with `moerge experts build-esft`") from None


def load_esft(folder: Path, base: MoeBase, *, max_bytes: int | None = None) -> EsftAdapter:
    """Validate an ESFT adapter folder against `base`; raise a typed ExpertError on any problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterConfigError(f"{folder} is not a folder: pass the folder `moerge experts build-esft` wrote")
    if max_bytes is not None:
        check_sizes(folder, max_bytes)
    config = _read_config(folder)
    _check_base(config, base)
    experts = _experts_map(config, base)
    tensors = _read_weights(folder)
    expected = {expert_key(layer, e, p) for layer, ids in experts.items() for e in ids for p in PROJ}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing:
        raise AdapterWeightsError(f"{WEIGHTS_NAME} lacks {len(missing)} tensors the config declares "
                                  f"(first: {missing[0]}): save every selected expert's w1, w3 and w2")
    if extra:
        raise AdapterWeightsError(f"{WEIGHTS_NAME} holds {len(extra)} tensors the config does not declare "
                                  f"(first: {extra[0]}): list their experts in \"experts\" or drop them")
    shapes = expert_shapes(base)
    for key in sorted(expected):
        t, want = tensors[key], shapes[key.split(".")[-2]]
        if tuple(t.shape) != want:
            raise ShapeMismatchError(f"'{key}' is {tuple(t.shape)}, but the MoE base's experts need {want}: "
                                     f"the adapter was made for another model; train it on {base.id}")
        if not t.is_floating_point():
            raise AdapterWeightsError(f"'{key}' has dtype {t.dtype}: expert weights must be floating point")
        if not torch.isfinite(t).all():
            raise NonFiniteWeightsError(f"'{key}' holds NaN or Inf values: the adapter is corrupt or its "
                                        "training diverged; train it again")
    return EsftAdapter(config=config, experts=experts, tensors=tensors)


def synthetic_esft(base: MoeBase, out: Path, experts: dict[int, list[int]], seed: int,
                   weights: dict[str, torch.Tensor] | None = None) -> Path:
    """A stand-in ESFT adapter for tests and benchmarks: the base's experts plus seeded noise (half their
    standard deviation), which changes greedy answers. Ids, shapes and format are a trained adapter's.
    `weights`: the base's checkpoint tensors, when the caller has them already."""
    if weights is None:
        weights = read_safetensors(base.path / WEIGHTS)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, ids in experts.items():
        for e in ids:
            for p in PROJ:
                x = weights[checkpoint_key(layer, e, p)].float()
                tensors[expert_key(layer, e, p)] = x + 0.5 * x.std() * torch.randn(x.shape, generator=g)
    return save_esft(out, base, experts, tensors, task="synthetic")


def merged_checkpoint(base: MoeBase, adapter: EsftAdapter, out_dir: Path) -> Path:
    """A standalone Mixtral checkpoint: `base` with the adapter's experts copied into their ids.

    The reference a served base + adapter must match token for token. Everything but the weights
    (config, tokenizer, manifest) is copied; the manifest records the adapter it carries."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:8]}")
    stage.mkdir()
    try:
        for p in base.path.iterdir():
            if p.is_file() and p.name not in (WEIGHTS, MANIFEST):
                shutil.copy2(p, stage / p.name)
        from safetensors.torch import save_file
        weights = read_safetensors(base.path / WEIGHTS)
        for layer, ids in adapter.experts.items():
            for e in ids:
                for p in PROJ:
                    target = checkpoint_key(layer, e, p)
                    weights[target] = adapter.tensors[expert_key(layer, e, p)].to(weights[target].dtype).contiguous()
        save_file(weights, str(stage / WEIGHTS), metadata={"format": "pt"})
        manifest = json.loads((base.path / MANIFEST).read_text())
        manifest["version"] = hashlib.sha256((stage / WEIGHTS).read_bytes()).hexdigest()
        manifest["esft"] = {"base_moe": base.version, "experts": {str(k): v for k, v in adapter.experts.items()},
                            "task": adapter.config.get("task", "")}
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        stage.rename(out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out_dir
