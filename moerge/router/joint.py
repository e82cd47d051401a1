"""`joint`: token-level routing with jointly trained gates, the request pooled per layer.

The router reads the request once with the base model (transformers, over the user's text) and, for
every adapted module, averages the joint gate logits (moerge/experts/joint_gates.py) over the user's
tokens. Those pooled logits become that module's bias inside the engine (`gate_mode="pooled"`), where
each module keeps its own top-k experts and mixes them by softmax: so every layer routes the request
on its own, and different layers may use different experts. No global (card) score is involved.

The set must be trained for the pool (`moerge experts train-joint`); experts added since are not
routed by it until it is retrained, and the explanation says so (`stale`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from moerge.router.token import TokenRouter

_READERS: dict[str, object] = {}
_READERS_LOCK = threading.Lock()


def hidden_reader(base_dir: Path | str):
    """One HiddenReader (a transformers copy of the base model) per base model, per process."""
    from moerge.experts.joint_gates import HiddenReader
    key = str(base_dir)
    with _READERS_LOCK:
        if key not in _READERS:
            _READERS[key] = HiddenReader(base_dir)
        return _READERS[key]


class JointRouter(TokenRouter):
    name = "joint"
    mode = "pooled"
    role = ""

    def __init__(self, top_k: int = 2, temperature: float = 1.0, scale: float = 1.0, base_dir: str | None = None):
        super().__init__(top_k, temperature)
        self.scale = scale
        self.base_dir = base_dir
        self._set = None
        self._set_key = None
        self._lock = threading.Lock()

    def gate_set(self):
        """The pool's current joint gate set (re-read when `current` moves)."""
        from moerge.experts.joint_gates import JointGatesError, _root, current_joint
        pointer = _root(self.ctx.pool) / "current"
        key = pointer.read_text().strip() if pointer.exists() else None
        with self._lock:
            if key != self._set_key or self._set is None:
                jg = current_joint(self.ctx.pool)
                if jg is None:
                    raise JointGatesError("the pool has no joint gate set: train one with "
                                          "`moerge experts train-joint` (about 3 minutes for 12 experts)")
                self._set, self._set_key = jg, key
            return self._set

    def reader(self):
        if self.base_dir is None:
            from moerge.config import get_settings
            self.base_dir = str(get_settings().base_model_dir)
        return hidden_reader(self.base_dir)

    def eligible(self) -> list[str]:
        jg = self.gate_set()
        known = jg.known(self.ctx.pool)
        return [n for n in jg.experts if known[n]]

    def request_bias(self, query, names):
        jg = self.gate_set()
        pooled = jg.pooled_logits(self.reader().read(query))
        col = {n: i for i, n in enumerate(jg.experts)}
        idx = torch.tensor([col[n] for n in names], dtype=torch.long)
        module_bias = {k: dict(zip(names, (self.scale * v.index_select(0, idx)).tolist())) for k, v in pooled.items()}
        vote = jg.vote({k: v.index_select(0, idx) for k, v in pooled.items()}) if names else torch.zeros(0)
        scores = dict(zip(names, vote.tolist()))
        per_layer: dict[int, dict[str, int]] = {}
        for k, v in pooled.items():
            layer = int(k.split(".")[0])
            top = jg.experts[int(v.argmax())]
            per_layer.setdefault(layer, {}).setdefault(top, 0)
            per_layer[layer][top] += 1
        detail = {"module_bias": module_bias, "scores": scores, "gate_set": jg.version[:16],
                  "vote_top": max(scores, key=scores.get) if scores else None,
                  "vote_share": round(max(scores.values()), 4) if scores else 0.0,
                  "layer_top": {str(layer): max(c, key=c.get) for layer, c in sorted(per_layer.items())}}
        stale = jg.stale(self.ctx.pool)
        if stale:
            detail["stale"] = stale
        return {}, detail
