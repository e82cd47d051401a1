"""What routers share: the pool's cards as vectors (FAISS), the embedder, the instruction
writer, token-level gate tables, and the calibrated abstain thresholds. Kept in step with
the pool through its change events, so a registered expert routes at once.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moerge.router.index import ExpertIndex

CALIBRATION_FILE = Path(__file__).resolve().parent.parent / "experts" / "library" / "router_calibration.json"


@dataclass
class ExpertVectors:
    card: np.ndarray                    # [dim] unit norm: description + tags (+ examples, averaged)
    examples: np.ndarray | None         # [n, dim] unit norm, for `retrieval`


@dataclass
class Calibration:
    """Abstain thresholds on the top score of each sequence-level method (None = never abstain),
    and glider's global weight α chosen on held-in development prompts (None = not calibrated)."""

    thresholds: dict[str, float] = field(default_factory=dict)
    detail: dict = field(default_factory=dict)
    alpha: float | None = None

    @classmethod
    def load(cls, path: Path = CALIBRATION_FILE) -> "Calibration":
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        return cls(thresholds=data.get("thresholds", {}), detail=data.get("detail", {}), alpha=data.get("alpha"))

    def save(self, path: Path = CALIBRATION_FILE) -> None:
        data = {"thresholds": self.thresholds, "alpha": self.alpha, "detail": self.detail}
        path.write_text(json.dumps(data, indent=2) + "\n")


class RouterContext:
    def __init__(self, pool, embed, *, instruction_writer=None, calibration: Calibration | None = None,
                 approximate_above: int = 10_000):
        self.pool = pool
        self.embed = embed                      # list[str] -> [n, dim] unit-norm float32
        self.instruction_writer = instruction_writer
        self.calibration = calibration or Calibration.load()
        self._lock = threading.RLock()
        self.vectors: dict[str, ExpertVectors] = {}
        dim = int(embed(["probe"]).shape[1])
        self.card_index = ExpertIndex(dim, approximate_above)
        self._gate_cache: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for card in pool.list():
            self._add(card)
        pool.on_change(self._on_change)

    # -- pool events ------------------------------------------------------------------
    def _on_change(self, event: str, name: str) -> None:
        with self._lock:
            self._drop(name)
            if event in ("added", "updated"):
                self._add(self.pool.get(name))

    def _drop(self, name: str) -> None:
        self.vectors.pop(name, None)
        self.card_index.remove(name)
        for key in [k for k in self._gate_cache if k[0] == name]:
            del self._gate_cache[key]

    def _add(self, card) -> None:
        if "card_embedding" not in card.artifacts:
            return
        desc = self.pool.artifact_tensors(card, "card_embedding")["embedding"].numpy()
        examples = None
        if "example_embeddings" in card.artifacts:
            examples = self.pool.artifact_tensors(card, "example_embeddings")["embeddings"].numpy()
        vec = desc if examples is None else desc + examples.mean(axis=0)
        vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
        self.vectors[card.name] = ExpertVectors(card=vec.astype(np.float32), examples=examples)
        self.card_index.add(card.name, vec)

    # -- reads ----------------------------------------------------------------------
    def gate_table(self, name: str, role: str) -> dict[str, torch.Tensor]:
        """module -> vector for one expert's 'arrow' prototypes or PHATGOOSE 'gate'."""
        key = (name, role)
        with self._lock:
            if key not in self._gate_cache:
                card = self.pool.get(name)
                if role not in card.artifacts:
                    raise KeyError(f"expert {name!r} has no {role} artifact")
                self._gate_cache[key] = self.pool.artifact_tensors(card, role)
            return self._gate_cache[key]

    def threshold(self, method: str) -> float | None:
        return self.calibration.thresholds.get(method)
