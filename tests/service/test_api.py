"""The service over HTTP: experts registered by upload route at once; bad input gets the right
4xx with a message and leaves the pool unchanged; keys, limits and metrics work."""

from __future__ import annotations

import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.helpers import make_lora, tree_snapshot
from tests.service.test_openai_client import ServerThread

ADMIN = {"Authorization": "Bearer admin-secret"}
USER = {"Authorization": "Bearer user-key"}
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(real_settings, tmp_path_factory):
    from moerge.service.app import create_app
    from moerge.service.factory import build_runtime
    pool_dir = tmp_path_factory.mktemp("svc-pool")
    s = real_settings.model_copy(update={"pool_dir": pool_dir, "admin_key": "admin-secret", "api_keys": ["user-key"],
                                         "routing_method": "embed", "max_upload_mb": 8.0,
                                         "max_request_bytes": 20 * 2**20, "rate_limit_per_minute": 1000})
    runtime = build_runtime(s, progress=lambda m: None)
    with ServerThread(create_app(runtime)) as url:
        yield url, runtime


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, base_model_dir):
    return make_lora(base_model_dir, tmp_path_factory.mktemp("ad") / "pirate", base_name=BASE_ID, scale_b=0.02)


def _files(folder):
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(folder.iterdir())]


def _register(url, folder, name, headers=ADMIN, **extra):
    data = {"name": name, "description": "Translates English sentences into pirate speak, arr.",
            "examples": json.dumps(["Say it like a pirate: hello my friend"]), **extra}
    return httpx.post(f"{url}/v1/experts", data=data, files=_files(folder), headers=headers, timeout=120)


@pytest.mark.real
def test_register_by_upload_then_pinned_and_auto_routed_without_restart(server, adapter):
    url, runtime = server
    r = _register(url, adapter, "pirate")
    assert r.status_code == 201, r.text
    assert r.json()["has_arrow"]
    from openai import OpenAI
    client = OpenAI(base_url=url + "/v1", api_key="user-key")
    models = [m.id for m in client.models.list().data]
    assert "pirate" in models and "auto" in models
    raw = client.chat.completions.with_raw_response.create(
        model="pirate", max_tokens=8, temperature=0, messages=[{"role": "user", "content": "hello"}])
    assert raw.headers["x-moerge-experts"] == "pirate"
    resp = raw.parse()
    assert resp.model_extra["moerge"]["chosen"] == ["pirate"]
    auto = client.chat.completions.create(model="auto", max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "Translate into pirate speak: hello my friend"}])
    assert auto.model_extra["moerge"]["experts"][0]["name"] == "pirate"
    route = httpx.post(f"{url}/v1/route", headers=USER, json={
        "model": "moerge:embed", "messages": [{"role": "user", "content": "Say this like a pirate would: good morning"}]})
    assert route.status_code == 200 and route.json()["experts"][0]["name"] == "pirate"


@pytest.mark.real
def test_register_from_tar_gz_and_remove(server, adapter):
    url, _ = server
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in adapter.iterdir():
            tar.add(p, arcname=f"pirate2/{p.name}")
    r = httpx.post(f"{url}/v1/experts", data={"name": "pirate2", "description": "pirate again"},
                   files=[("file", ("adapter.tar.gz", buf.getvalue(), "application/gzip"))], headers=ADMIN)
    assert r.status_code == 201, r.text
    assert httpx.get(f"{url}/v1/experts/pirate2").json()["name"] == "pirate2"
    assert httpx.patch(f"{url}/v1/experts/pirate2", json={"tags": ["fun"]}, headers=ADMIN).json()["tags"] == ["fun"]
    assert httpx.delete(f"{url}/v1/experts/pirate2", headers=ADMIN).status_code == 200
    assert httpx.get(f"{url}/v1/experts/pirate2").status_code == 404


def _evil_tar():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../../escape.txt")
        data = b"gotcha"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _symlink_tar():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("adapter_model.safetensors")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    return buf.getvalue()


@pytest.mark.real
def test_bad_inputs_get_4xx_with_message_and_pool_is_unchanged(server, adapter, tmp_path):
    url, runtime = server
    before = tree_snapshot(runtime.pool.root, ignore=(".lock",))
    names = runtime.pool.names()
    chat = f"{url}/v1/chat/completions"
    good_chat = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    bad_cfg = tmp_path / "badcfg"
    bad_cfg.mkdir()
    (bad_cfg / "adapter_config.json").write_text("{oops")
    (bad_cfg / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    pickle_dir = tmp_path / "pickle"
    pickle_dir.mkdir()
    (pickle_dir / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    (pickle_dir / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    cases = [
        (httpx.post(chat, content=b"{nope", headers={**USER, "content-type": "application/json"}), 400, "invalid request"),
        (httpx.post(chat, json={**good_chat, "model": "nobody"}, headers=USER), 404, "nobody"),
        (httpx.post(chat, json={**good_chat, "messages": [{"role": "wizard", "content": "x"}]}, headers=USER), 400, "role"),
        (httpx.post(chat, json={**good_chat, "max_tokens": 10**6}, headers=USER), 400, "limit"),
        (httpx.post(chat, json=good_chat), 401, "missing API key"),
        (httpx.post(chat, json=good_chat, headers={"Authorization": "Bearer wrong"}), 401, "invalid API key"),
        (_register(url, adapter, "pirate3", headers=USER), 403, "admin key"),
        (_register(url, adapter, "pirate3", headers={}), 401, "admin key"),
        (_register(url, bad_cfg, "broken"), 400, "adapter_config.json"),
        (_register(url, pickle_dir, "pickled"), 400, "pickle"),
        (_register(url, adapter, "../evil"), 400, "path separator"),
        (httpx.post(f"{url}/v1/experts", data={"name": "evil"}, headers=ADMIN,
                    files=[("f", ("a.tar.gz", _evil_tar(), "application/gzip"))]), 400, "outside"),
        (httpx.post(f"{url}/v1/experts", data={"name": "evil"}, headers=ADMIN,
                    files=[("f", ("a.tar.gz", _symlink_tar(), "application/gzip"))]), 400, "link"),
        (httpx.post(f"{url}/v1/experts", data={"name": "big"}, headers=ADMIN,
                    files=[("f", ("adapter_model.safetensors", b"0" * (9 * 2**20), "x"))]), 413, "limit"),
        (httpx.post(chat, content=b"x" * (21 * 2**20), headers={**USER, "content-type": "application/json"}), 413, "limit"),
        (httpx.post(f"{url}/v1/experts", json={"kind": "model", "name": "remote", "model": "openai/x"},
                    headers=ADMIN), 400, "API base"),
        (httpx.delete(f"{url}/v1/experts/ghost", headers=ADMIN), 404, "ghost"),
    ]
    for resp, status, needle in cases:
        assert resp.status_code == status, (status, resp.status_code, resp.text)
        assert needle.lower() in resp.json()["error"]["message"].lower(), resp.text
    assert runtime.pool.names() == names
    assert tree_snapshot(runtime.pool.root, ignore=(".lock",)) == before


@pytest.mark.real
def test_32_concurrent_chats_while_an_expert_registers(server, adapter):
    url, _ = server

    def chat(i):
        r = httpx.post(f"{url}/v1/chat/completions", headers=USER, timeout=300, json={
            "model": "auto" if i % 2 else "base", "max_tokens": 4,
            "messages": [{"role": "user", "content": f"Say something nice #{i}"}]})
        return r.status_code

    with ThreadPoolExecutor(32) as ex:
        futures = [ex.submit(chat, i) for i in range(32)]
        reg = _register(url, adapter, "pirate-concurrent")
        codes = [f.result() for f in futures]
    assert reg.status_code == 201, reg.text
    assert codes == [200] * 32


def _metrics(url) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text) for s in family.samples}


@pytest.mark.real
def test_stream_carries_routing_in_first_chunk_and_metrics_count_each_request(server):
    url, _ = server
    from openai import OpenAI
    client = OpenAI(base_url=url + "/v1", api_key="user-key")
    before = _metrics(url)
    chunks = list(client.chat.completions.create(model="base", max_tokens=6, stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert chunks[0].model_extra["moerge"]["method"] == "base"
    usage = next(c.usage for c in chunks if c.usage)
    anonymous = httpx.post(f"{url}/v1/chat/completions",
                           json={"model": "base", "messages": [{"role": "user", "content": "hi"}]})
    assert anonymous.status_code == 401
    after = _metrics(url)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("moerge_requests_total", path="/v1/chat/completions", status="200") == 1
    assert delta("moerge_requests_total", path="/v1/chat/completions", status="401") == 1
    assert delta("moerge_requests_total", path="/metrics", status="200") == 1    # the scrape before
    assert delta("moerge_request_seconds_count", path="/v1/chat/completions") == 2
    assert delta("moerge_routing_seconds_count", method="base") == 1             # the 401 was never routed
    assert delta("moerge_expert_requests_total", expert="(base)") == 1
    assert delta("moerge_tokens_total", kind="completion") == usage.completion_tokens > 0
    assert delta("moerge_tokens_total", kind="prompt") == usage.prompt_tokens > 0


@pytest.mark.real
def test_gate_training_job_over_http(server, adapter):
    url, _ = server
    assert _register(url, adapter, "gated").status_code == 201
    examples = [{"prompt": f"Say it like a pirate: hello {i}", "answer": f"Ahoy {i}, matey!"} for i in range(6)]
    r = httpx.post(f"{url}/v1/experts/gated/gate", json={"examples": examples, "steps": 3}, headers=ADMIN)
    assert r.status_code == 202
    status_url = url + r.json()["status_url"]
    import time
    deadline = time.time() + 300
    while (job := httpx.get(status_url).json())["status"] == "running":
        assert time.time() < deadline
        time.sleep(0.5)
    assert job["status"] == "succeeded", job
    assert httpx.get(f"{url}/v1/experts/gated").json()["has_gate"]
