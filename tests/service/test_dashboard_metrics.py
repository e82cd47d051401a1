"""The metrics the Grafana dashboard (deploy/grafana/dashboards/moerge.json) reads move with requests:
routing decisions per method and expert, abstains, per-layer expert usage of token-level plans, and the
in-flight gauge. Their names are printed before any request, so each test compares values before and after."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers import make_lora
from tests.service.test_openai_client import ServerThread

BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PIRATE = "Translates English sentences into pirate speak, arr."


@pytest.fixture(scope="module")
def server(real_settings, tmp_path_factory, base_model_dir):
    from moerge.service.app import create_app
    from moerge.service.factory import build_runtime
    s = real_settings.model_copy(update={"pool_dir": tmp_path_factory.mktemp("dash-pool"), "routing_method": "embed"})
    runtime = build_runtime(s, progress=lambda m: None)
    adapter = make_lora(base_model_dir, tmp_path_factory.mktemp("dash-ad") / "pirate", base_name=BASE_ID, scale_b=0.02)
    runtime.pool.register_lora(adapter, "pirate", PIRATE, examples=["Say it like a pirate: hello my friend"])
    with ServerThread(create_app(runtime)) as url:
        yield url


def metrics(url) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text) for s in family.samples}


def moved(before: dict, after: dict, name: str) -> dict[tuple, float]:
    """{labels: after - before} for every sample of `name` that changed."""
    keys = {k for k in (*before, *after) if k[0] == name}
    return {k[1]: after.get(k, 0.0) - before.get(k, 0.0) for k in keys if after.get(k, 0.0) != before.get(k, 0.0)}


def chat(url, model: str, prompt: str, **extra) -> dict:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": prompt}], **extra})
    assert r.status_code == 200, r.text
    return r.json()["moerge"]


@pytest.mark.real
def test_routing_decisions_and_abstains_are_counted_per_method_and_expert(server):
    before = metrics(server)
    routed = chat(server, "moerge:embed", "Say this like a pirate would: good morning")
    away = chat(server, "moerge:embed", "What is the boiling point of iron in kelvin, to three digits?")
    after = metrics(server)
    assert routed["chosen"] == ["pirate"] and not routed["abstain"], routed
    assert away["abstain"], away          # below embed's calibrated threshold: the base model answers
    assert moved(before, after, "moerge_routing_decisions_total") == {
        (("expert", "pirate"), ("method", "embed")): 1.0, (("expert", "(base)"), ("method", "embed")): 1.0}
    assert moved(before, after, "moerge_routing_abstain_total") == {(("method", "embed"),): 1.0}


@pytest.mark.real
@pytest.mark.parametrize("stream", [False, True])
def test_token_level_requests_add_their_per_layer_usage(server, stream):
    before = metrics(server)
    if stream:
        with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=120, json={
                "model": "moerge:arrow", "max_tokens": 3, "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": "Say it like a pirate: the ship is late"}]}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        usage = events[-1]["moerge"]["layer_usage"]
    else:
        usage = chat(server, "moerge:arrow", "Say it like a pirate: the ship is late")["layer_usage"]
    after = metrics(server)
    assert usage, "a token-level plan reports its per-layer usage"
    expected = {(("expert", e), ("layer", layer)): share for layer, shares in usage.items()
                for e, share in shares.items() if share}
    got = moved(before, after, "moerge_layer_expert_usage_total")
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(v) for k, v in expected.items())


@pytest.mark.real
def test_inflight_gauge_counts_an_open_stream_and_drops_when_it_ends(server):
    def inflight() -> float:
        return metrics(server)[("moerge_inflight_requests", ())]

    assert inflight() == 0
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=120, json={
            "model": "base", "max_tokens": 96, "ignore_eos": True, "stream": True, "messages": [{"role": "user", "content": "Tell a story"}]}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")     # the first chunk: the request is admitted and running
        assert inflight() == 1
        for _ in lines:
            pass
    assert inflight() == 0


@pytest.mark.real
def test_a_removed_experts_series_leave_metrics(server):
    """Last in this module: it removes the expert the others use."""
    chat(server, "moerge:embed", "Say this like a pirate would: good evening")
    chat(server, "moerge:arrow", "Say it like a pirate: the tide is turning")

    def pirate_series() -> set[str]:
        return {name for name, labels in metrics(server) if ("expert", "pirate") in labels}

    assert pirate_series() >= {"moerge_routing_decisions_total", "moerge_expert_requests_total",
                               "moerge_layer_expert_usage_total"}
    assert httpx.delete(f"{server}/v1/experts/pirate").status_code == 200
    assert pirate_series() == set()
    assert any(name == "moerge_routing_decisions_total" for name, _ in metrics(server))   # others stay
