"""Validate a whole-model expert: a local model folder, or a LiteLLM model string with an API base."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlparse

from moerge.experts.errors import InvalidModelExpertError, UnsafeFormatError
from moerge.experts.lora import PICKLE_SUFFIXES

_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}$")


def _local_folder(path: Path) -> dict:
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise InvalidModelExpertError(f"{path} is not a folder: pass a model folder saved by "
                                      "save_pretrained, or --model and --api-base for a served model")
    try:
        config = json.loads((path / "config.json").read_text())
        model_type = config["model_type"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InvalidModelExpertError(f"{path} has no valid config.json with a model_type: "
                                      "it is not a transformers model folder") from None
    if not list(path.glob("*.safetensors")):
        pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            raise UnsafeFormatError(f"{path} holds only pickle-based weights ({', '.join(pickles)}): "
                                    "convert them to safetensors")
        raise InvalidModelExpertError(f"{path} holds no *.safetensors weights")
    return {"path": str(path), "model_type": model_type,
            "base_model": config.get("_name_or_path") or ""}


def validate_model_expert(*, model: str | None, api_base: str | None, api_key_env: str | None,
                          path: Path | None) -> dict:
    """Return the reference stored for the expert; raise InvalidModelExpertError otherwise."""
    if path is not None:
        if model or api_base:
            raise InvalidModelExpertError("give either a local model folder or --model with --api-base, not both")
        return _local_folder(path)
    if not model:
        raise InvalidModelExpertError("a whole-model expert needs a local model folder or a LiteLLM "
                                      "model string (e.g. 'openai/my-model') with --api-base")
    if not _MODEL_RE.match(model):
        raise InvalidModelExpertError(f"{model!r} is not a LiteLLM model string such as 'openai/my-model'")
    if not api_base:
        raise InvalidModelExpertError(f"model {model!r} needs an API base URL (e.g. http://127.0.0.1:8001/v1)")
    url = urlparse(api_base)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise InvalidModelExpertError(f"api_base {api_base!r} is not an http(s) URL")
    if api_key_env is not None and not _ENV_RE.match(api_key_env):
        raise InvalidModelExpertError(f"api_key_env {api_key_env!r} must be the name of an environment "
                                      "variable, not the key itself")
    return {"model": model, "api_base": api_base.rstrip("/"), "api_key_env": api_key_env}
