"""Sentence embeddings (all-MiniLM-L6-v2 from its PyPI package), L2-normalised float32."""

from __future__ import annotations

import os
import threading
from functools import lru_cache

import numpy as np


class Embedder:
    def __init__(self, path: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device="cpu")
        self.dim = int(self.model.get_embedding_dimension()
                       if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        """[n, dim] float32, unit norm."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            out = self.model.encode(list(texts), batch_size=64, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(out, dtype=np.float32)


@lru_cache(maxsize=2)
def get_embedder(path: str | None = None) -> Embedder:
    if path is None:
        from moerge.assets import embedder_path
        path = str(embedder_path())
    return Embedder(path)
