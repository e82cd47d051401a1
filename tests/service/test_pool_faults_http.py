"""Over HTTP: registrations while another process holds the registry's lock (503 + Retry-After), and
while the disk under the pool is full (507). The pool is byte-for-byte unchanged, and the same
requests succeed once the lock is released or space is freed. The pool lives on a real 8 MiB tmpfs
where one can be mounted (the disk-full test needs it; the lock test runs either way)."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import time

import httpx
import pytest

from tests.experts.test_pool_faults import fill, held_lock
from tests.helpers import make_lora, tree_snapshot
from tests.service.test_openai_client import ServerThread

BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def pool_disk(tmp_path_factory):
    """(folder, mounted): an 8 MiB tmpfs where mounting is permitted, else a plain temporary folder."""
    mnt = tmp_path_factory.mktemp("pool-disk")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    yield mnt, r.returncode == 0
    if r.returncode == 0:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="module")
def fault_server(real_settings, tmp_path_factory, base_model_dir, pool_disk):
    from moerge.service.app import create_app
    from moerge.service.factory import build_runtime
    s = real_settings.model_copy(update={"pool_dir": pool_disk[0] / "pool", "routing_method": "embed",
                                         "registry_busy_timeout_s": 1.0})
    runtime = build_runtime(s, progress=lambda m: None)
    keeper = make_lora(base_model_dir, tmp_path_factory.mktemp("keeper") / "k", base_name=BASE_ID, r=2,
                       targets=("q_proj",))
    runtime.pool.register_lora(keeper, "keeper", "already in the pool")
    with ServerThread(create_app(runtime)) as url:
        yield url, runtime
    runtime.pool.close()


@pytest.fixture(scope="module")
def adapter(base_model_dir, tmp_path_factory):
    return make_lora(base_model_dir, tmp_path_factory.mktemp("new") / "n", base_name=BASE_ID, r=2,
                     targets=("v_proj",), seed=5)


def _targz(folder) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(folder / name, arcname=name)
    return buf.getvalue()


def _register(url: str, how: str, name: str, adapter) -> httpx.Response:
    """One registration over HTTP: a whole model as JSON, a LoRA's files, or a LoRA as one tar.gz."""
    if how == "model":
        return httpx.post(f"{url}/v1/experts", timeout=60, json={
            "kind": "model", "name": name, "model": "openai/some-model", "api_base": "http://127.0.0.1:9/v1",
            "description": "a served model registered while the pool is in trouble"})
    if how == "files":
        files = [("files", (n, (adapter / n).read_bytes(), "application/octet-stream"))
                 for n in ("adapter_config.json", "adapter_model.safetensors")]
    else:
        files = [("file", ("adapter.tar.gz", _targz(adapter), "application/gzip"))]
    return httpx.post(f"{url}/v1/experts", data={"name": name, "description": "a LoRA registered in trouble"},
                      files=files, timeout=60)


HOW = ["model", "files", "archive"]


def _assert_error(r: httpx.Response, status: int, message: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == str(status)
    assert err["message"] == message, err["message"]


@pytest.mark.real
def test_registrations_while_another_process_holds_the_registry_lock_get_503_then_succeed(fault_server, adapter):
    url, runtime = fault_server
    before = tree_snapshot(runtime.pool.root)
    names = runtime.pool.names()
    with held_lock(runtime.pool.root / "registry.sqlite", "EXCLUSIVE"):
        for how in HOW:
            t0 = time.monotonic()
            r = _register(url, how, f"locked-{how}", adapter)
            elapsed = time.monotonic() - t0
            _assert_error(r, 503, "the expert registry is busy: another process has held its database lock for "
                          "over 1 s (registry_busy_timeout_s); nothing was changed: send the request again shortly")
            assert r.headers["retry-after"] == "2"
            assert 1.0 <= elapsed < 8.0, (how, elapsed)
        # a read waits as long and gets the same answer
        _assert_error(httpx.get(f"{url}/v1/experts", timeout=60), 503, r.json()["error"]["message"])
        assert tree_snapshot(runtime.pool.root) == before
    assert runtime.pool.names() == names
    assert tree_snapshot(runtime.pool.root) == before
    for how in HOW:
        r = _register(url, how, f"locked-{how}", adapter)
        assert r.status_code == 201, r.text
    assert runtime.pool.names() == sorted(names + [f"locked-{how}" for how in HOW])
    for how in HOW:
        assert httpx.delete(f"{url}/v1/experts/locked-{how}", timeout=60).status_code == 200


@pytest.mark.real
def test_registrations_on_a_full_disk_get_507_and_the_pool_is_unchanged_then_succeed(fault_server, adapter,
                                                                                      pool_disk):
    disk, mounted = pool_disk
    if not mounted:
        pytest.skip("cannot mount a tmpfs here: tests/experts/test_pool_faults.py covers the full disk with "
                    "RLIMIT_FSIZE")
    url, runtime = fault_server
    root = runtime.pool.root
    before = tree_snapshot(root)
    names = runtime.pool.names()
    filler = fill(disk, 0)
    try:
        for how in HOW:
            r = _register(url, how, f"full-{how}", adapter)
            _assert_error(r, 507, f"no space left on the device holding the expert pool ({root}); nothing was "
                          "registered: free some space there (or set MOERGE_POOL_DIR to a larger disk) and send "
                          "the registration again")
            assert tree_snapshot(root) == before
            assert shutil.disk_usage(disk).free == 0     # whatever was written was given back
        assert runtime.pool.names() == names
        # the service still answers on a full disk
        assert httpx.get(f"{url}/v1/experts/keeper", timeout=60).status_code == 200
    finally:
        filler.unlink()
    for how in HOW:
        r = _register(url, how, f"full-{how}", adapter)
        assert r.status_code == 201, r.text
    assert runtime.pool.names() == sorted(names + [f"full-{how}" for how in HOW])
    for how in HOW:
        assert httpx.delete(f"{url}/v1/experts/full-{how}", timeout=60).status_code == 200
