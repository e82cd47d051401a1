"""The service on the vLLM engine over loopback HTTP, on the real model.

- A bounded load run: 96 chat requests at once, mixed plans (base and two pinned experts) while a third
  expert is registered and removed over and over. Every request gets 200 and the same greedy answer it
  gets alone; afterwards nothing is left open in the engine or in the admission count.
- The usage of an answer says how many prompt tokens came from vLLM's prefix cache, as OpenAI's does."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from tests.helpers import make_lora
from tests.service.test_backpressure import _serve

BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
N = 96


@pytest.fixture(scope="module")
def served(real_settings, base_model_dir, tmp_path_factory):
    from moerge.service.app import create_app
    from moerge.service.runtime import Runtime
    from moerge.startup import start

    tmp_path = tmp_path_factory.mktemp("load")
    system = start(real_settings, executor="vllm", pool_dir=tmp_path / "pool", bundled=False, with_router=False,
                   vllm_options=dict(dtype="float32", max_num_seqs=32), progress=lambda m: None)
    server = None
    try:
        assert system.local[0].wait_ready(900)
        app = create_app(Runtime(system))
        server, thread, port = _serve(app)
        yield system, app, port, tmp_path
    finally:
        if server is not None:
            server.should_exit = True
        system.shutdown()


@pytest.mark.real
@pytest.mark.slow
def test_96_concurrent_mixed_requests_while_experts_change_all_get_their_solo_answer(served, base_model_dir):
    system, app, port, tmp_path = served
    vx = system.local[0]
    for i, name in enumerate(("expert-a", "expert-b", "churn")):
        folder = make_lora(base_model_dir, tmp_path / name, base_name=BASE_ID, r=4, seed=20 + i, scale_b=0.3)
        if name != "churn":
            system.pool.register_lora(folder, name, f"load test expert {name}")
        else:
            churn = folder
    models = ["base", "expert-a", "expert-b"]
    prompts = ["What is 2 + 3?", "Name a colour.", "Say hello in French."]

    def body(i):
        return {"model": models[i % 3], "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": prompts[(i // 3) % 3]}]}

    async def run():
        limits = httpx.Limits(max_connections=N + 4)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=600) as c:
            solo = {i: await c.post("/v1/chat/completions", json=body(i)) for i in range(9)}
            together = await asyncio.gather(*[c.post("/v1/chat/completions", json=body(i)) for i in range(N)])
        return solo, together

    stop, churned = threading.Event(), []

    def churn_loop():
        while not stop.is_set():
            system.pool.register_lora(churn, "churn", "registered and removed under load")
            system.pool.remove("churn")
            churned.append(1)

    churner = threading.Thread(target=churn_loop, daemon=True)
    churner.start()
    try:
        solo, together = asyncio.run(run())
    finally:
        stop.set()
        churner.join(60)
    assert [r.status_code for r in together] == [200] * N, [r.text for r in together if r.status_code != 200][:3]
    for i, r in enumerate(together):
        want = solo[i % 9].json()["choices"][0]["message"]["content"]
        assert r.json()["choices"][0]["message"]["content"] == want, (i, body(i))
    assert {r.headers["x-moerge-engine"] for r in together} == {"vllm"}
    assert churned                                             # experts really changed during the run
    assert "churn" not in system.pool.names()
    assert vx.engine.output_processor.get_num_unfinished_requests() == 0
    assert app.state.inflight.open == 0


@pytest.mark.real
def test_usage_reports_the_prompt_tokens_taken_from_the_prefix_cache(served):
    """OpenAI's `usage.prompt_tokens_details.cached_tokens`: a second request that shares a long system
    message with the first has its prefix blocks from vLLM's cache (128 tokens each on CPU); the
    Prometheus token counter counts them too. Streamed answers report it in their last chunk."""
    from openai import OpenAI
    _, _, port, _ = served
    url = f"http://127.0.0.1:{port}"
    client = OpenAI(base_url=url + "/v1", api_key="unused")
    system = "You answer questions about a small bakery. " + " ".join(
        f"Rule {i}: loaves of kind {i} cost {i + 2} coins and are baked at {6 + i % 5} o'clock." for i in range(30))

    def ask(question, **kw):
        return client.chat.completions.with_raw_response.create(
            model="base", max_tokens=4, temperature=0,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}], **kw)

    first = ask("How much is a loaf of kind 3?")
    assert first.headers["x-moerge-engine"] == "vllm"
    assert first.parse().usage.prompt_tokens > 300
    before = _cached_counter(url)
    second = ask("When is kind 4 baked?")
    usage = second.parse().usage
    assert usage.prompt_tokens_details.cached_tokens >= 256
    assert usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    assert _cached_counter(url) - before == usage.prompt_tokens_details.cached_tokens
    chunks = list(ask("Which kind costs 7 coins?", stream=True).parse())
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 256


def _cached_counter(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith('moerge_tokens_total{kind="prompt_cached"}'):
            return float(line.split()[-1])
    return 0.0
