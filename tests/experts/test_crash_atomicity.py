"""A registration killed with SIGKILL at any stage leaves no trace once the pool is reopened."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moerge.experts.pool import ExpertPool
from tests.helpers import make_lora, tree_snapshot

CHILD = textwrap.dedent("""
    import sys, time, pathlib
    from moerge.experts.lora import base_spec_from_folder
    from moerge.experts.pool import ExpertPool
    from moerge.experts.store import ArtifactStore
    from moerge.experts.registry import Registry
    import numpy as np

    root, base, adapter, ready, stage = sys.argv[1:6]
    spec = base_spec_from_folder(base, "tiny/llama")

    def hang():
        pathlib.Path(ready).write_text("x")
        time.sleep(600)

    if stage == "copy":            # half-way through copying the weights into staging
        orig = ArtifactStore.stage_file
        def stage_file(self, src, chunk=1 << 20):
            with open(src, "rb") as fin, open(self.staging / "w.part", "wb") as fout:
                fout.write(fin.read(100))
                fout.flush()
            hang()
        ArtifactStore.stage_file = stage_file
    elif stage == "publish":       # after some blobs reached their content address
        orig = ArtifactStore.publish
        def publish(self, digest, staged):
            out = orig(self, digest, staged)
            hang()
        ArtifactStore.publish = publish
    elif stage == "db":            # inside the open DB transaction, row inserted, not committed
        orig = Registry.insert
        def insert(self, conn, card):
            orig(self, conn, card)
            hang()
        Registry.insert = insert

    embed = lambda texts: np.ones((len(texts), 8), dtype=np.float32)
    pool = ExpertPool(pathlib.Path(root), f"sqlite:///{root}/registry.sqlite", spec, embed=embed)
    pool.register_lora(pathlib.Path(adapter), "victim", "registered while killed")
""")


@pytest.mark.parametrize("stage", ["copy", "publish", "db"])
def test_sigkill_during_registration_leaves_no_trace(stage, tmp_path, tiny_base, tiny_spec, embedder):
    root = tmp_path / "pool"
    pool = ExpertPool(root, f"sqlite:///{root}/registry.sqlite", tiny_spec, embed=embedder.encode)
    pool.register_lora(make_lora(tiny_base, tmp_path / "a", base_name="tiny/llama", seed=3), "survivor", "kept")
    pool.close()
    before = tree_snapshot(root)
    adapter = make_lora(tiny_base, tmp_path / "b", base_name="tiny/llama", seed=4, r=8)
    ready = tmp_path / "ready"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    child = subprocess.Popen([sys.executable, str(script), str(root), str(tiny_base), str(adapter),
                              str(ready), stage], env=env)
    deadline = time.time() + 120
    while not ready.exists():
        assert child.poll() is None, "child exited before reaching the kill point"
        assert time.time() < deadline
        time.sleep(0.05)
    _assert_killed_at(stage, root, before, adapter)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert tree_snapshot(root) != before  # the crash did leave something behind

    reopened = ExpertPool(root, f"sqlite:///{root}/registry.sqlite", tiny_spec, embed=embedder.encode)
    assert reopened.names() == ["survivor"]
    assert tree_snapshot(root, ignore=(".lock",)) == before
    # and the pool still works: the killed registration can be made again, the survivor still loads
    reopened.register_lora(adapter, "victim", "registered after the crash")
    assert reopened.names() == ["survivor", "victim"]
    assert reopened.lora_weights(reopened.get("survivor"))
    reopened.close()


def _blobs(root) -> set[str]:
    return {p.name for p in (root / "blobs").glob("*/*")}


def _assert_killed_at(stage, root, before, adapter):
    """The child is where its stage says it is: nothing committed yet, and the expected debris present."""
    db = root / "registry.sqlite"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:  # what another process sees
        assert [r[0] for r in conn.execute("select name from experts")] == ["survivor"]
    old_blobs = {k.rsplit("/", 1)[-1] for k in before if k.startswith("blobs/")}
    new_blobs = _blobs(root) - old_blobs
    weights = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    if stage == "copy":            # a partial staging file, nothing published
        assert (root / "staging" / "w.part").stat().st_size == 100
        assert not new_blobs
    elif stage == "publish":       # exactly one blob at its content address, the rest not yet
        assert len(new_blobs) == 1
    elif stage == "db":            # every blob published, the row written inside an open transaction
        assert weights in new_blobs and len(new_blobs) >= 4
        assert Path(f"{db}-journal").exists()
