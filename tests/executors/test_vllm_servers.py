"""Two real vLLM OpenAI servers on loopback as moerge's engines, each with two adapter slots, serving
five bundled experts and more: every adapter answers with the reference engine's greedy tokens,
placement and loads/unloads show in /metrics, one load for concurrent requests, no eviction of an
adapter in use, no old weights after a re-registration, a closed stream aborts the server's request,
and a killed server is left for the other and used again once it is back.

The servers run in float32, as the in-process vLLM tests do, so tokens can be compared exactly with
the float32 reference engine. They load moerge's vLLM plugin (this venv), as a server started from
it does in production. One start for the whole file; the kill comes last."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import replace

import httpx
import pytest

from moerge.executors.engine_server import EngineServer
from moerge.models.generation import SamplingParams
from moerge.router.base import RoutingDecision
from tests.helpers import answer_tokens, make_lora, pinned
from tests.service.test_openai_client import ServerThread, free_port

BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EXPERTS = ("arith_add", "uppercase", "reverse_words", "capital_of", "sentiment")
PROMPTS = {"arith_add": "What is 345 + 210? Answer with the number only.",
           "uppercase": "Convert to upper case: the cat sat on the mat",
           "reverse_words": "Reverse the order of the words: red green blue",
           "capital_of": "What is the capital of Peru?",
           "sentiment": "Is this review positive or negative? The food was cold and late."}
SLOTS = 2


@pytest.fixture(scope="module")
def engines(base_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("engine-logs")
    servers = [EngineServer(base_model_dir, free_port(), log=logs / f"engine{i}.log", cores=str(i),
                            max_loras=SLOTS, max_lora_rank=64, dtype="float32") for i in range(2)]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait()
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def system(real_settings, engines, tmp_path_factory):
    from moerge.startup import start
    settings = real_settings.model_copy(update={"engine_urls": [s.url for s in engines], "engine_max_loras": SLOTS,
                                                "executor": "servers"})
    system = start(settings, pool_dir=tmp_path_factory.mktemp("servers-pool"), bundled=True, with_router=False,
                   progress=lambda m: None)
    assert system.local[0].wait_ready(60)
    yield system
    system.shutdown()


@pytest.fixture(scope="module")
def service(system):
    from moerge.service.app import create_app
    from moerge.service.runtime import Runtime
    with ServerThread(create_app(Runtime(system))) as url:
        yield url


def _metrics(service) -> dict[tuple, float]:
    """moerge_engine_* samples: (name, labels as sorted tuple) -> value."""
    out = {}
    for line in httpx.get(service + "/metrics", timeout=30).text.splitlines():
        m = re.match(r"^(moerge_engine_\w+)\{(.*)\} (\S+)$", line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m[2])))
            out[(m[1], labels)] = float(m[3])
    return out


def _total(samples: dict, name: str, **match) -> float:
    return sum(v for (n, labels), v in samples.items()
               if n == name and all((k, val) in labels for k, val in match.items()))


def _server_models(url: str) -> list[str]:
    return [c["id"] for c in httpx.get(url + "/v1/models", timeout=10).json()["data"] if c.get("parent")]


def _ids(system, names):
    return [system.encode([{"role": "user", "content": PROMPTS[n]}]) for n in names]


@pytest.mark.real
@pytest.mark.slow
def test_every_adapter_gives_the_reference_tokens_with_more_adapters_than_one_engine_holds(system, service):
    sx, ref = system.local
    assert sx.name == "servers" and ref.name == "reference"
    plans = [system.plan(pinned(n)) for n in EXPERTS]
    assert {p.engine for p in plans} == {"servers"} and not any(p.fallback for p in plans)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    want = ref.generate_many(_ids(system, EXPERTS), params, [replace(p, engine="reference") for p in plans])
    for round_ in range(2):       # twice, each adapter alone: 5 adapters through 4 slots, every one evicted once
        got = [sx.generate_tokens(i, params, p) for i, p in zip(_ids(system, EXPERTS), plans)]
        assert [answer_tokens(g) for g in got] == [answer_tokens(w) for w in want], round_
    together = sx.generate_many(_ids(system, EXPERTS), params, plans)      # all at once: one waits for a slot
    assert [answer_tokens(g) for g in together] == [answer_tokens(w) for w in want]
    assert len({tuple(answer_tokens(w)) for w in want}) == len(EXPERTS)          # the experts really differ
    m = _metrics(service)
    assert _total(m, "moerge_engine_adapter_loads_total") >= len(EXPERTS) + 1
    assert _total(m, "moerge_engine_adapter_unloads_total", reason="lru") >= 1
    assert all(_total(m, "moerge_engine_adapters", engine=s["url"]) <= SLOTS for s in sx.placement())
    placed = {dict(labels)["adapter"]: dict(labels)["engine"] for (n, labels), v in m.items()
              if n == "moerge_engine_adapter_placement"}
    assert placed and all(k.split("@")[0] in EXPERTS for k in placed)
    for s in sx.placement():            # what the table says each server holds, the server holds
        assert set(s["adapters"]) <= set(_server_models(s["url"]))
    assert all(_total(m, "moerge_engine_up", engine=s["url"]) == 1 for s in sx.placement())
    # through the service: a pinned chat answers on a server; a token-level plan falls back with the reason
    r = httpx.post(service + "/v1/chat/completions", timeout=120, json={
        "model": "uppercase", "messages": [{"role": "user", "content": PROMPTS["uppercase"]}], "max_tokens": 8,
        "temperature": 0})
    assert r.status_code == 200 and r.json()["moerge"]["engine"] == "servers"
    token = RoutingDecision("arrow", "token", chosen=list(EXPERTS), gating={"gate_set": "arrow", "mode": "arrow"})
    plan = system.plan(token)
    assert plan.engine == "reference" and "servers does not run token_mixture plans" in plan.fallback
    engine = httpx.get(service + "/v1/engine", timeout=30).json()
    assert engine["engines"][0]["name"] == "servers" and len(engine["engines"][0]["state"]["servers"]) == 2


def _fresh_expert(system, base_model_dir, tmp_path, name: str, seed: int):
    ad = make_lora(base_model_dir, tmp_path / f"{name}-{seed}", base_name=BASE_ID, r=4, seed=seed, scale_b=0.3)
    system.pool.register_lora(ad, name, f"a random adapter ({name}, seed {seed})")
    return system.plan(pinned(name))


def _loads(sx) -> int:
    return sum(s["loads"] for s in sx.placement())


@pytest.mark.real
@pytest.mark.slow
def test_concurrent_requests_for_one_new_adapter_cause_one_load(system, base_model_dir, tmp_path):
    sx, _ = system.local
    plan = _fresh_expert(system, base_model_dir, tmp_path, "crowd", seed=11)
    before = _loads(sx)
    ids = _ids(system, ["uppercase"] * 6)
    got = sx.generate_many(ids, SamplingParams(max_tokens=4), [plan] * 6)
    assert len({tuple(g.token_ids) for g in got}) == 1
    assert _loads(sx) - before == 1
    holders = [s["url"] for s in sx.placement() if plan.experts[0].key in s["adapters"]]
    assert len(holders) == 1


@pytest.mark.real
@pytest.mark.slow
def test_an_answer_reports_the_prompt_tokens_its_server_took_from_its_prefix_cache(system, base_model_dir, tmp_path):
    """The servers run with vLLM's prefix cache and --enable-prompt-tokens-details (engine_server.py): a second
    request on the same adapter that shares a long prefix with the first reports the reused tokens, answering
    and streaming; nothing else has sent these prompts."""
    sx, _ = system.local
    plan = _fresh_expert(system, base_model_dir, tmp_path, "cached", seed=21)
    rules = " ".join(f"Rule {i}: item {i} costs {i + 3} coins." for i in range(40))
    chats = [[{"role": "system", "content": rules}, {"role": "user", "content": q}]
             for q in ("What does item 5 cost?", "What does item 9 cost?", "What does item 2 cost?")]
    ids = [system.encode(c) for c in chats]
    assert len(ids[0]) > 300
    params = SamplingParams(max_tokens=4)
    first = sx.generate_tokens(ids[0], params, plan)
    second = sx.generate_tokens(ids[1], params, plan)       # the adapter's server: it holds the adapter
    assert first.cached_tokens < 256 <= second.cached_tokens < second.prompt_tokens
    deltas = list(sx.stream(chats[2], params, plan))
    assert deltas[-1].finish_reason and deltas[-1].cached_tokens >= 256


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.long
def test_an_adapter_with_a_request_in_flight_is_not_evicted(system):
    """A long request on one adapter while every other slot turns over twice: it keeps its slot, and
    its tokens equal a run with no pressure."""
    sx, _ = system.local
    plans = {n: system.plan(pinned(n)) for n in EXPERTS}
    long = SamplingParams(max_tokens=400, ignore_eos=True)
    ids = _ids(system, ["uppercase"])[0]
    want = sx.generate_tokens(ids, long, plans["uppercase"])
    key = plans["uppercase"].experts[0].key
    unloads_before = {s["url"]: dict(s["unloads"]) for s in sx.placement()}
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("got", sx.generate_tokens(ids, long, plans["uppercase"])))
    worker.start()
    deadline = time.monotonic() + 60
    while not any(s["adapters"].get(key, {}).get("inflight") for s in sx.placement()):
        assert time.monotonic() < deadline, "the long request did not start"
        time.sleep(0.05)
    others = [n for n in EXPERTS if n != "uppercase"]
    short = SamplingParams(max_tokens=2)
    for n in others * 2:      # 4 other adapters through the 3 free slots, twice
        sx.generate_tokens(_ids(system, [n])[0], short, plans[n])
        assert any(key in s["adapters"] for s in sx.placement())
    assert worker.is_alive(), "the long request ended before the pressure did: make it longer"
    worker.join(300)
    assert answer_tokens(out["got"]) == answer_tokens(want) and len(want.token_ids) == 400
    after = {s["url"]: s["unloads"] for s in sx.placement()}
    assert sum(after[u].get("lru", 0) - unloads_before[u].get("lru", 0) for u in after) >= 2   # others were evicted


@pytest.mark.real
@pytest.mark.slow
def test_a_removed_and_registered_again_expert_is_never_served_with_old_weights(system, base_model_dir, tmp_path):
    sx, ref = system.local
    ids = _ids(system, ["capital_of"])[0]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    old = _fresh_expert(system, base_model_dir, tmp_path, "flip", seed=21)
    got_old = sx.generate_tokens(ids, params, old)
    assert answer_tokens(got_old) == answer_tokens(ref.generate_many([ids], params, [replace(old, engine="reference")])[0])
    old_key = old.experts[0].key
    removed_before = sum(s["unloads"].get("removed", 0) for s in sx.placement())
    system.pool.remove("flip")
    deadline = time.monotonic() + 20
    while any(old_key in s["adapters"] for s in sx.placement()) or \
            any(old_key in _server_models(s["url"]) for s in sx.placement()):
        assert time.monotonic() < deadline, "the removed expert's adapter stayed on a server"
        time.sleep(0.1)
    assert sum(s["unloads"].get("removed", 0) for s in sx.placement()) == removed_before + 1
    new = _fresh_expert(system, base_model_dir, tmp_path, "flip", seed=22)
    assert new.experts[0].key != old_key
    got_new = sx.generate_tokens(ids, params, new)
    want_new = ref.generate_many([ids], params, [replace(new, engine="reference")])[0]
    assert answer_tokens(got_new) == answer_tokens(want_new) != answer_tokens(got_old)


def _running(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("vllm:num_requests_running"))


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.long
def test_closing_a_stream_aborts_the_request_on_the_server(system):
    sx, _ = system.local
    plan = system.plan(pinned("uppercase"))
    messages = [{"role": "user", "content": PROMPTS["uppercase"]}]

    async def run():
        stream = sx.astream(messages, SamplingParams(max_tokens=800, ignore_eos=True), plan)
        first = await anext(stream)
        url = next(s["url"] for s in sx.placement() if s["inflight"])
        busy = _running(url)
        await stream.aclose()
        for _ in range(100):
            if _running(url) == 0:
                break
            await asyncio.sleep(0.1)
        return first, busy, _running(url), url
    first, busy, after, url = asyncio.run(run())
    assert first.text and busy == 1 and after == 0
    assert sum(s["inflight"] for s in sx.placement()) == 0


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.long
def test_the_placement_of_a_running_pool_is_adopted_by_a_new_executor(system, base_model_dir):
    """A replica starting next to running servers reads what they hold (GET /v1/models) and loads nothing again."""
    from moerge.executors.vllm_servers import VllmServersExecutor
    sx, _ = system.local
    held = {s["url"]: set(s["adapters"]) for s in sx.placement()}
    fresh = VllmServersExecutor(sx.urls, base_model_dir, max_loras=SLOTS)
    try:
        assert fresh.wait_ready(30)
        assert {s["url"]: set(s["adapters"]) for s in fresh.placement()} == held
        name = sorted(set().union(*held.values()))[0].split("@")[0]
        fresh.generate_tokens(_ids(system, ["uppercase"])[0], SamplingParams(max_tokens=2), system.plan(pinned(name)))
        assert sum(s["loads"] for s in fresh.placement()) == 0
    finally:
        fresh.shutdown()


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.long
def test_a_killed_server_is_left_for_the_other_and_used_again_when_it_is_back(system, engines, service):
    import signal
    sx, ref = system.local
    plans = [system.plan(pinned(n)) for n in EXPERTS]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    want = ref.generate_many(_ids(system, EXPERTS), params, [replace(p, engine="reference") for p in plans])
    victim, survivor = engines
    victim.stop(signal.SIGKILL)
    got = [sx.generate_tokens(i, params, p) for i, p in zip(_ids(system, EXPERTS), plans)]
    assert [answer_tokens(g) for g in got] == [answer_tokens(w) for w in want]
    m = _metrics(service)
    assert _total(m, "moerge_engine_up", engine=victim.url) == 0
    assert _total(m, "moerge_engine_up", engine=survivor.url) == 1
    assert _total(m, "moerge_engine_adapters", engine=victim.url) == 0
    victim.start().wait()
    deadline = time.monotonic() + 30
    while not all(s["up"] for s in sx.placement()):
        assert time.monotonic() < deadline, "the restarted server was not marked up again"
        time.sleep(0.2)
    loads = {s["url"]: s["loads"] for s in sx.placement()}
    got = sx.generate_many(_ids(system, EXPERTS), params, plans)      # 5 adapters, 2 slots each: both serve
    assert [answer_tokens(g) for g in got] == [answer_tokens(w) for w in want]
    assert next(s for s in sx.placement() if s["url"] == victim.url)["loads"] > loads[victim.url]
