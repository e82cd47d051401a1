"""An MoE base on disk: a standard Mixtral checkpoint plus `moerge_moe.json`, versioned in the pool.

The folder is what both transformers (`MixtralForCausalLM.from_pretrained`) and vLLM load.
`moerge_moe.json` says where each logical expert came from and the checkpoint's version (the
sha256 of `model.safetensors`). Built bases live in `<pool>/moe/<version[:16]>/`; the file
`<pool>/moe/current` names the one the service serves and ESFT adapters are trained against.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from moerge.experts.errors import ExpertError

MANIFEST = "moerge_moe.json"
WEIGHTS = "model.safetensors"
CURRENT = "current"


class MoeBaseError(ExpertError):
    """No MoE base, or one that cannot be read (the message says what to run)."""
    status = 409


@dataclass(frozen=True)
class MoeBase:
    path: Path
    version: str              # sha256 of model.safetensors
    experts: tuple[str, ...]  # logical expert id -> its source: "base" (the plain MLP) or a LoRA expert's name
    sources: tuple[str, ...]  # logical expert id -> that source's version ("" for base)
    top_k: int
    n_layers: int
    hidden: int
    intermediate: int
    base_model: str           # the dense model it was upcycled from
    router_init: str

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    @property
    def id(self) -> str:
        """The name ESFT adapters record as their base: the version pins the exact weights."""
        return f"moe@{self.version[:16]}"

    @classmethod
    def load(cls, path: Path) -> "MoeBase":
        path = Path(path)
        try:
            man = json.loads((path / MANIFEST).read_text())
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise MoeBaseError(f"{path} is not an MoE base ({e}): build one with `moerge moe build`") from None
        return cls(path=path, version=man["version"], experts=tuple(man["experts"]),
                   sources=tuple(man.get("sources", [""] * len(man["experts"]))),
                   top_k=int(cfg["num_experts_per_tok"]), n_layers=int(cfg["num_hidden_layers"]),
                   hidden=int(cfg["hidden_size"]), intermediate=int(cfg["intermediate_size"]),
                   base_model=man.get("base_model", ""), router_init=man.get("router_init", ""))


def moe_root(pool_root: Path) -> Path:
    return Path(pool_root) / "moe"


def current_moe(pool_root: Path) -> MoeBase | None:
    """The pool's current MoE base, or None when none was built."""
    pointer = moe_root(pool_root) / CURRENT
    if not pointer.exists():
        return None
    return MoeBase.load(moe_root(pool_root) / pointer.read_text().strip())


def require_moe(pool_root: Path) -> MoeBase:
    base = current_moe(pool_root)
    if base is None:
        raise MoeBaseError("this pool has no MoE base: build one with `moerge moe build`")
    return base


def set_current(pool_root: Path, base: MoeBase) -> None:
    root = moe_root(pool_root)
    tmp = root / f".{CURRENT}.{os.getpid()}"
    tmp.write_text(base.path.name + "\n")
    os.replace(tmp, root / CURRENT)


def list_moe(pool_root: Path) -> list[MoeBase]:
    root = moe_root(pool_root)
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and (d / MANIFEST).exists():
            out.append(MoeBase.load(d))
    return out
