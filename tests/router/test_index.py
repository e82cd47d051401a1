"""The FAISS card index adds and removes experts incrementally, exact or approximate."""

from __future__ import annotations

import numpy as np

from moerge.router.index import ExpertIndex


def _unit(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_exact_index_search_add_remove():
    rng = np.random.default_rng(0)
    vecs = _unit(rng, 20, 16)
    idx = ExpertIndex(16)
    for i, v in enumerate(vecs):
        idx.add(f"e{i}", v)
    q = vecs[7]
    assert idx.search(q, 1)[0][0] == "e7"
    scores = dict(idx.search(q))
    assert np.isclose(scores["e3"], float(vecs[3] @ q), atol=1e-5)
    idx.remove("e7")
    assert "e7" not in dict(idx.search(q)) and len(idx) == 19
    idx.add("e7", -vecs[7])               # re-adding a name replaces its vector
    assert idx.search(q)[-1][0] == "e7"


def test_switches_to_hnsw_above_threshold_and_back():
    rng = np.random.default_rng(1)
    vecs = _unit(rng, 60, 32)
    idx = ExpertIndex(32, approximate_above=50)
    for i, v in enumerate(vecs):
        idx.add(f"e{i}", v)
    assert idx.approximate
    hits = sum(idx.search(vecs[i], 1)[0][0] == f"e{i}" for i in range(60))
    assert hits >= 57                      # approximate, but near-exact at this size
    for i in range(15):
        idx.remove(f"e{i}")
    assert not idx.approximate and len(idx) == 45
    assert idx.search(vecs[30], 1)[0][0] == "e30"
