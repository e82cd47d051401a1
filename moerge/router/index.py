"""FAISS index over expert card vectors, updated incrementally as experts come and go.

Exact inner product (vectors are unit norm, so this is cosine) up to `approximate_above`
experts; above that an HNSW graph. HNSW cannot delete, so a removal rebuilds it.
"""

from __future__ import annotations

import threading

import faiss
import numpy as np


class ExpertIndex:
    def __init__(self, dim: int, approximate_above: int = 10_000, hnsw_m: int = 32):
        self.dim = dim
        self.approximate_above = approximate_above
        self.hnsw_m = hnsw_m
        self._vectors: dict[str, np.ndarray] = {}
        self._ids: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._next_id = 0
        self._lock = threading.RLock()
        self._index = self._new_index(0)

    def _new_index(self, n: int):
        if n > self.approximate_above:
            inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efSearch = 128
        else:
            inner = faiss.IndexFlatIP(self.dim)
        return faiss.IndexIDMap2(inner)

    @property
    def approximate(self) -> bool:
        return isinstance(faiss.downcast_index(self._index.index), faiss.IndexHNSWFlat)

    def __len__(self) -> int:
        return len(self._vectors)

    def names(self) -> list[str]:
        return sorted(self._vectors)

    def _rebuild(self) -> None:
        self._index = self._new_index(len(self._vectors))
        if self._vectors:
            names = list(self._vectors)
            self._index.add_with_ids(np.stack([self._vectors[n] for n in names]),
                                     np.array([self._ids[n] for n in names], dtype=np.int64))

    def add(self, name: str, vector: np.ndarray) -> None:
        v = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        v = v / max(float(np.linalg.norm(v)), 1e-12)
        with self._lock:
            if name in self._vectors:
                self.remove(name)
            self._ids[name] = self._next_id
            self._names[self._next_id] = name
            self._next_id += 1
            self._vectors[name] = v[0]
            was_exact = not self.approximate
            if was_exact and len(self._vectors) > self.approximate_above:
                self._rebuild()
            else:
                self._index.add_with_ids(v, np.array([self._ids[name]], dtype=np.int64))

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._vectors:
                return
            del self._vectors[name]
            i = self._ids.pop(name)
            self._names.pop(i, None)
            if self.approximate or len(self._vectors) == self.approximate_above:
                self._rebuild()
            else:
                self._index.remove_ids(np.array([i], dtype=np.int64))

    def search(self, query: np.ndarray, k: int | None = None) -> list[tuple[str, float]]:
        """Best first [(name, cosine)] for one unit-norm query vector."""
        with self._lock:
            n = len(self._vectors)
            if n == 0:
                return []
            k = min(k or n, n)
            scores, ids = self._index.search(np.asarray(query, dtype=np.float32).reshape(1, -1), k)
            return [(self._names[int(i)], float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]

    def all_scores(self, query: np.ndarray) -> dict[str, float]:
        return dict(self.search(query))
