"""A registration while another process holds the registry's lock, or while the disk is full: a typed
error in bounded time, the pool byte-for-byte as before, and the same registration succeeds once the
lock is released or space is freed.

The full disk is real: a 3 MiB tmpfs (needs root), or, where mounting is not permitted, a child
process whose file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the kernel refuse the write."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from moerge.experts.errors import RegistryBusyError, StorageFullError
from moerge.experts.pool import ExpertPool
from tests.helpers import make_lora, tree_snapshot

PAGE = 4096

HOLDER = textwrap.dedent("""
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN " + sys.argv[2])
    print("locked", flush=True)
    sys.stdin.readline()
    conn.execute("ROLLBACK")
    print("released", flush=True)
""")


@contextlib.contextmanager
def held_lock(db: Path, mode: str = "EXCLUSIVE"):
    """Another process holds `BEGIN <mode>` on the SQLite file `db` until the block ends.

    EXCLUSIVE: no other connection may read or write. IMMEDIATE: others may read, not write."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(db), mode], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        assert holder.wait(10) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def _new_blobs(root: Path, before: dict) -> set[str]:
    return {str(p.relative_to(root)) for p in (root / "blobs").glob("*/*")} - set(before)


@pytest.mark.parametrize("mode", ["EXCLUSIVE", "IMMEDIATE"])
def test_registration_under_another_process_lock_is_refused_in_bounded_time_and_changes_nothing(
        mode, tmp_path, tiny_base, tiny_spec, embedder):
    root = tmp_path / "pool"
    pool = ExpertPool(root, f"sqlite:///{root}/registry.sqlite", tiny_spec, embed=embedder.encode,
                      busy_timeout_s=1.0)
    pool.register_lora(make_lora(tiny_base, tmp_path / "a", base_name="tiny/llama", seed=3), "survivor", "kept")
    adapter = make_lora(tiny_base, tmp_path / "b", base_name="tiny/llama", seed=4, r=8)
    before = tree_snapshot(root)
    seen: set[str] = set()          # blobs that appeared while the registration waited on the lock
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                seen.update(_new_blobs(root, before))
            except FileNotFoundError:       # a blob folder removed while being listed: look again
                pass
            time.sleep(0.005)

    with held_lock(root / "registry.sqlite", mode):
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(RegistryBusyError) as err:
                pool.register_lora(adapter, "victim", "registered while the registry is locked")
        finally:
            elapsed = time.monotonic() - t0
            stop.set()
            watcher.join()
        assert tree_snapshot(root) == before          # checked while the lock is still held
    assert err.value.status == 503 and err.value.retry_after
    assert err.value.message == ("the expert registry is busy: another process has held its database lock for "
                                 "over 1 s (registry_busy_timeout_s); nothing was changed: send the request "
                                 "again shortly")
    assert 1.0 <= elapsed < 4.0, elapsed               # the busy timeout, not the old 30 s, not forever
    if mode == "EXCLUSIVE":     # refused at the first read: nothing was written
        assert not seen
    else:                       # reads go on: every blob was published, then the insert waited and failed
        assert len(seen) >= 4, seen
    assert pool.names() == ["survivor"]
    assert tree_snapshot(root) == before
    # the lock released, the same registration succeeds
    pool.register_lora(adapter, "victim", "registered after the lock was released")
    assert pool.names() == ["survivor", "victim"]
    assert pool.lora_weights(pool.get("victim"))
    pool.close()


# -- the disk full ------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs; skipped where mounting is not permitted (the rlimit test covers that case)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` to the last byte, then give back `leave` bytes (whole pages); return the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * (64 * 1024 if shutil.disk_usage(disk).free > 64 * 1024 else PAGE))
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert shutil.disk_usage(disk).free == 0
    if leave:
        os.truncate(filler, filler.stat().st_size - leave)
    assert shutil.disk_usage(disk).free == leave
    return filler


def _pages(paths) -> int:
    return sum(-(-Path(p).stat().st_size // PAGE) for p in paths)


@pytest.mark.parametrize("where", ["blob", "registry"])
def test_registration_on_a_full_disk_is_a_507_error_and_the_pool_is_unchanged(
        where, small_disk, tmp_path, tiny_base, tiny_spec, embedder):
    root = small_disk / "pool"
    pool = ExpertPool(root, f"sqlite:///{root}/registry.sqlite", tiny_spec, embed=embedder.encode)
    pool.register_lora(make_lora(tiny_base, tmp_path / "a", base_name="tiny/llama", seed=3), "survivor", "kept")
    adapter = make_lora(tiny_base, tmp_path / "b", base_name="tiny/llama", seed=4, r=8)
    weights = adapter / "adapter_model.safetensors"
    if where == "blob":         # room for half the weights: the copy into staging stops half-way
        leave = (weights.stat().st_size // 2) // PAGE * PAGE
        assert leave >= PAGE
    else:                       # room for every blob, none for SQLite's journal: the insert fails
        scratch = ExpertPool(tmp_path / "scratch", f"sqlite:///{tmp_path}/scratch/registry.sqlite", tiny_spec,
                             embed=embedder.encode)
        card = scratch.register_lora(adapter, "victim", "registered on a full disk")
        leave = _pages(scratch.store.path(d) for d in set(card.artifacts.values())) * PAGE
        scratch.close()
    before = tree_snapshot(root)
    filler = fill(small_disk, leave)
    with pytest.raises(StorageFullError) as err:
        pool.register_lora(adapter, "victim", "registered on a full disk")
    cause = err.value.__cause__
    if where == "blob":
        assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC
        assert err.value.message == (
            f"no space left on the device holding the expert pool ({root}); nothing was registered: free some "
            "space there (or set MOERGE_POOL_DIR to a larger disk) and send the registration again")
    else:
        assert "database or disk is full" in str(cause)
        assert err.value.message == (
            f"no space left on the device holding the expert registry ({root / 'registry.sqlite'}); nothing was "
            "registered: free some space there and send the request again")
    assert err.value.status == 507
    assert tree_snapshot(root) == before                    # no half-written blob, no staging file, no row
    assert shutil.disk_usage(small_disk).free == leave      # and nothing unlinked but still held open
    assert pool.names() == ["survivor"]
    reopened = ExpertPool(root, f"sqlite:///{root}/registry.sqlite", tiny_spec, embed=embedder.encode)
    assert tree_snapshot(root) == before
    reopened.close()
    # space freed, the same registration succeeds
    filler.unlink()
    pool.register_lora(adapter, "victim", "registered once there was room")
    assert pool.names() == ["survivor", "victim"]
    assert pool.lora_weights(pool.get("victim"))
    pool.close()


RLIMIT_CHILD = textwrap.dedent("""
    import json, pathlib, resource, signal, sys
    import numpy as np
    from moerge.experts.errors import ExpertError
    from moerge.experts.lora import base_spec_from_folder
    from moerge.experts.pool import ExpertPool

    root, base, adapter, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    embed = lambda texts: np.ones((len(texts), 8), dtype=np.float32)
    pool = ExpertPool(pathlib.Path(root), f"sqlite:///{root}/registry.sqlite", base_spec_from_folder(base, "tiny/llama"),
                      embed=embed)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # the write then fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        pool.register_lora(pathlib.Path(adapter), "victim", "registered past the file-size limit")
        out = {"registered": True}
    except ExpertError as e:
        c = e.__cause__
        out = {"type": type(e).__name__, "status": e.status, "message": e.message,
               "cause_errno": getattr(c, "errno", None)}
    print(json.dumps(out))
""")


def test_registration_past_the_file_size_limit_is_a_507_error_and_the_pool_is_unchanged(
        tmp_path, tiny_base, tiny_spec, embedder):
    """Where no tmpfs can be mounted, the kernel still refuses the write: RLIMIT_FSIZE, EFBIG."""
    root = tmp_path / "pool"
    embed = lambda texts: __import__("numpy").ones((len(texts), 8), dtype="float32")  # noqa: E731 - as the child
    pool = ExpertPool(root, f"sqlite:///{root}/registry.sqlite", tiny_spec, embed=embed)
    pool.register_lora(make_lora(tiny_base, tmp_path / "a", base_name="tiny/llama", seed=3), "survivor", "kept")
    pool.close()
    adapter = make_lora(tiny_base, tmp_path / "b", base_name="tiny/llama", seed=4, r=8)
    limit = 16 * 1024
    assert (adapter / "adapter_model.safetensors").stat().st_size > 2 * limit
    before = tree_snapshot(root)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, "-c", RLIMIT_CHILD, str(root), str(tiny_base), str(adapter), str(limit)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"type": "StorageFullError", "status": 507, "cause_errno": errno.EFBIG, "message": (
        f"a file in the expert pool ({root}) would pass this process's file-size limit; nothing was registered: "
        "raise the server's file-size limit (ulimit -f) and send the registration again")}, out
    assert tree_snapshot(root) == before
    pool = ExpertPool(root, f"sqlite:///{root}/registry.sqlite", tiny_spec, embed=embed)
    assert tree_snapshot(root) == before
    pool.register_lora(adapter, "victim", "registered without the limit")
    assert pool.names() == ["survivor", "victim"]
    pool.close()
