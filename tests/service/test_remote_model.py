"""A whole-model expert served by a second, real vLLM OpenAI server on loopback, reached through
LiteLLM; when it fails, the base model answers and the routing info says so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from tests.helpers import make_lora
from tests.service.test_openai_client import ServerThread, free_port

BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def merged_model(tmp_path_factory, base_model_dir):
    """One expert merged into a full model folder (peft merge_and_unload)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tmp = tmp_path_factory.mktemp("merged")
    ad = make_lora(base_model_dir, tmp / "ad", base_name=BASE_ID, scale_b=0.01)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32), ad)
    merged = model.merge_and_unload()
    merged.to(torch.bfloat16).save_pretrained(tmp / "model")
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(tmp / "model")
    return tmp / "model"


@pytest.fixture(scope="module")
def vllm_server(merged_model):
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "MOERGE_VLLM_PUNICA": "vllm"}
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(merged_model),
                             "--served-model-name", "merged-expert", "--host", "127.0.0.1", "--port", str(port),
                             "--max-model-len", "1024", "--dtype", "bfloat16"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while True:
        assert proc.poll() is None, "the vLLM OpenAI server exited during start-up"
        assert time.time() < deadline, "the vLLM OpenAI server did not start"
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    yield url, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


@pytest.fixture(scope="module")
def moerge_server(real_settings, tmp_path_factory):
    from moerge.service.app import create_app
    from moerge.service.factory import build_runtime
    s = real_settings.model_copy(update={"pool_dir": tmp_path_factory.mktemp("remote-pool")})
    runtime = build_runtime(s, progress=lambda m: None)
    runtime.system.remote.timeout = 30
    with ServerThread(create_app(runtime)) as url:
        yield url


@pytest.mark.real
@pytest.mark.slow
def test_remote_whole_model_is_registered_routed_and_falls_back(vllm_server, moerge_server):
    remote_url, proc = vllm_server
    r = httpx.post(f"{moerge_server}/v1/experts", json={
        "kind": "model", "name": "remote-expert", "model": "openai/merged-expert", "api_base": remote_url + "/v1",
        "description": "A served model that answers trivia about sea creatures and oceans."})
    assert r.status_code == 201, r.text
    from openai import OpenAI
    client = OpenAI(base_url=moerge_server + "/v1", api_key="none")
    msgs = [{"role": "user", "content": "Tell me one fact about whales."}]
    pinned = client.chat.completions.create(model="remote-expert", messages=msgs, max_tokens=12, temperature=0)
    direct = OpenAI(base_url=remote_url + "/v1", api_key="none").chat.completions.create(
        model="merged-expert", messages=msgs, max_tokens=12, temperature=0)
    assert pinned.choices[0].message.content == direct.choices[0].message.content
    assert pinned.model_extra["moerge"]["chosen"] == ["remote-expert"]
    routed = client.chat.completions.create(model="moerge:embed", messages=[{
        "role": "user", "content": "Trivia about sea creatures: how deep can a whale dive in the ocean?"}],
        max_tokens=8, temperature=0)
    assert routed.model_extra["moerge"]["chosen"] == ["remote-expert"]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="remote-expert", messages=msgs, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == direct.choices[0].message.content
    # the remote server goes away: the base model answers, and says so
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)
    fallback = client.chat.completions.create(model="remote-expert", messages=msgs, max_tokens=6, temperature=0)
    info = fallback.model_extra["moerge"]
    assert fallback.choices[0].message.content
    assert info["plan"] == "base" and "remote-expert" in info["fallback"] and "base model" in info["fallback"]
