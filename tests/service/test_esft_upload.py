"""ESFT adapters uploaded over HTTP (POST /v1/experts, multipart): a valid one is registered as an
`esft` expert of the pool's MoE base; one made for another MoE base, one with a pickle, and one over
the ESFT size limit get a clear 4xx and leave the pool byte-for-byte unchanged."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from moerge.moe.esft import CONFIG_NAME, PROJ, WEIGHTS_NAME, expert_key, save_esft
from tests.helpers import tree_snapshot
from tests.moe.test_esft import install_moe, tiny_moe
from tests.service.test_openai_client import ServerThread

ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture(scope="module")
def server(real_settings, tmp_path_factory, base_model_dir):
    from moerge.service.app import create_app
    from moerge.service.factory import build_runtime
    pool_dir = tmp_path_factory.mktemp("esft-upload-pool")
    base = install_moe(pool_dir, tiny_moe(tmp_path_factory.mktemp("tiny-moe"), base_model_dir))
    s = real_settings.model_copy(update={"pool_dir": pool_dir, "admin_key": "admin-secret", "routing_method": "embed",
                                         "max_esft_upload_mb": 0.05, "moe_engine": "off"})
    runtime = build_runtime(s, progress=lambda m: None)
    with ServerThread(create_app(runtime)) as url:
        yield url, runtime, base


def adapter(folder, base, experts={0: [1], 1: [0, 2]}, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"w1": (base.intermediate, base.hidden), "w3": (base.intermediate, base.hidden),
              "w2": (base.hidden, base.intermediate)}
    tensors = {expert_key(layer, e, p): torch.randn(shapes[p], generator=g)
               for layer, ids in experts.items() for e in ids for p in PROJ}
    return save_esft(folder, base, experts, tensors, task="tides")


def upload(url, folder, name, extra_files=()):
    files = [("files", (f, (folder / f).read_bytes(), "application/octet-stream")) for f in (CONFIG_NAME, WEIGHTS_NAME)]
    files += list(extra_files)
    return httpx.post(f"{url}/v1/experts", headers=ADMIN, files=files, timeout=60,
                      data={"name": name, "description": "Tide tables and sea depths.", "examples": "How deep is it?"})


@pytest.mark.real   # the real base model's tokenizer
def test_a_valid_esft_upload_is_registered_as_an_esft_expert(server, tmp_path):
    url, runtime, base = server
    r = upload(url, adapter(tmp_path / "a", base), "tides")
    assert r.status_code == 201, r.text
    card = httpx.get(f"{url}/v1/experts/tides", timeout=10).json()
    assert card["kind"] == "esft" and card["base_model"] == base.id
    assert card["examples"] == ["How deep is it?"] and "esft_weights" in card["artifacts"]
    assert (runtime.pool.esft_dir(runtime.pool.get("tides")) / WEIGHTS_NAME).exists()


@pytest.mark.real   # the real base model's tokenizer
@pytest.mark.parametrize("case", ["other_base", "pickle", "too_big"])
def test_a_bad_esft_upload_is_refused_and_leaves_the_pool_unchanged(server, tmp_path, case):
    url, runtime, base = server
    folder = adapter(tmp_path / "b", base)
    extra = ()
    if case == "other_base":
        cfg = json.loads((folder / CONFIG_NAME).read_text())
        cfg["base_moe"] = "0" * 64
        (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    elif case == "pickle":
        extra = [("files", ("esft_model.bin", b"\x80\x04K\x01.", "application/octet-stream"))]
    else:
        folder = adapter(tmp_path / "big", base, experts={0: [0, 1, 2, 3], 1: [0, 1, 2, 3]})
    assert ((folder / WEIGHTS_NAME).stat().st_size > 0.05 * 2**20) == (case == "too_big")
    before = tree_snapshot(runtime.pool.root, ignore=(".lock", "registry.sqlite-wal", "registry.sqlite-shm"))
    names = runtime.pool.names()
    r = upload(url, folder, f"bad_{case}", extra)
    assert 400 <= r.status_code < 500, r.text
    message = r.json()["error"]["message"].lower()
    assert {"other_base": "base", "pickle": "pickle", "too_big": "limit"}[case] in message, message
    assert runtime.pool.names() == names
    after = tree_snapshot(runtime.pool.root, ignore=(".lock", "registry.sqlite-wal", "registry.sqlite-shm"))
    assert {k: v for k, v in after.items() if not k.startswith("staging")} == \
        {k: v for k, v in before.items() if not k.startswith("staging")}
