"""`POST /v1/feedback` on the real service: it stores a score for a completion it answered (streamed or
not), refuses unknown ids and bad scores with a clear 4xx and stores nothing, and what it stored is
read back by a new pool object on the same registry. A correction replays every local expert and the
base model on the real engine and stores one scored row per arm."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.service.test_openai_client import ServerThread

USER = {"Authorization": "Bearer user-key"}


@pytest.fixture(scope="module")
def server(real_settings, tmp_path_factory):
    from moerge.service.app import create_app
    from moerge.service.factory import build_runtime
    s = real_settings.model_copy(update={"pool_dir": tmp_path_factory.mktemp("fb-pool"), "api_keys": ["user-key"],
                                         "routing_method": "embed", "rate_limit_per_minute": 1000})
    runtime = build_runtime(s, progress=lambda m: None)
    with ServerThread(create_app(runtime)) as url:
        yield url, runtime, s
    runtime.system.shutdown()


def _chat(url, **extra) -> httpx.Response:
    body = {"model": "base", "messages": [{"role": "user", "content": "What is 345 - 210?"}], "max_tokens": 3,
            "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=USER, timeout=120)


def _count(runtime) -> int:
    from moerge.router.feedback import store_for
    return store_for(runtime.pool.registry).count()


@pytest.mark.real
def test_feedback_is_stored_for_a_completion_and_read_by_a_new_pool(server):
    url, runtime, settings = server
    before = _count(runtime)
    cid = _chat(url).json()["id"]
    r = httpx.post(f"{url}/v1/feedback", json={"id": cid, "score": 0.0}, headers=USER, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() | {"id": None} == {"object": "feedback", "id": None, "completion_id": cid, "score": 0.0,
                                        "arm": "(base)", "method": "base"}
    # a streamed completion: its id is in the first chunk, and it is recorded before that chunk is sent
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=USER, timeout=120,
                      json={"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                            "stream": True}) as s:
        lines = s.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        sid = json.loads(first[6:])["id"]
        r = httpx.post(f"{url}/v1/feedback", json={"id": sid, "label": "good"}, headers=USER, timeout=30)
        assert r.status_code == 200 and r.json()["score"] == 1.0, r.text
        for _ in lines:
            pass
    assert _count(runtime) == before + 2

    from moerge.experts.pool import open_pool
    from moerge.router.feedback import FeedbackStore
    pool = open_pool(settings)            # a new pool object on the same registry (another process's view)
    try:
        mine = [i for i in FeedbackStore(pool.registry).items() if i.completion_id in (cid, sid)]
        assert sorted((i.completion_id, i.score, i.arm) for i in mine) == sorted([(cid, 0.0, "(base)"),
                                                                                  (sid, 1.0, "(base)")])
        assert mine[0].query in ("What is 345 - 210?", "Hi") and mine[0].embedding.shape == (384,)
    finally:
        pool.close()


@pytest.mark.real
def test_bad_feedback_gets_a_clear_4xx_and_stores_nothing(server):
    url, runtime, _ = server
    cid = _chat(url).json()["id"]
    before = _count(runtime)
    cases = [({"id": "chatcmpl-000000000000000000000000", "score": 1}, 404, "no completion"),
             ({"id": cid, "score": 1.5}, 400, "score must be a number in [0, 1]"),
             ({"id": cid, "score": -1}, 400, "score must be a number in [0, 1]"),
             ({"id": cid, "label": "meh"}, 400, "unknown label"),
             ({"id": cid}, 400, "needs a score"),
             ({"id": cid, "score": 1, "label": "bad"}, 400, "contradicts"),
             ({"score": 1}, 400, "id"),
             ({"id": cid, "score": 1, "extra": 2}, 400, "extra")]
    for body, status, words in cases:
        r = httpx.post(f"{url}/v1/feedback", json=body, headers=USER, timeout=30)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert words in err["message"] and err["code"] == str(status), (body, err)
    r = httpx.post(f"{url}/v1/feedback", json={"id": cid, "score": 1}, timeout=30)     # no key
    assert r.status_code == 401
    assert _count(runtime) == before


@pytest.mark.real
def test_a_correction_replays_every_expert_on_the_real_engine_and_scores_each(server):
    """The base model answered an addition; the correction (the right sum) makes the service answer it
    again with the pool's experts (the bundled arith_add and reverse_words) and the base model alone, on
    the real engine: arith_add's answer matches, reverse_words' does not, and one row per arm is stored."""
    from moerge.experts.bundled import library_entries
    from moerge.router.feedback import store_for
    url, runtime, _ = server
    library = Path(__file__).resolve().parents[2] / "moerge" / "experts" / "library"
    for name in ("arith_add", "reverse_words"):
        if runtime.pool.registry.get(name) is None:
            entry = next(e for e in library_entries() if e["name"] == name)
            runtime.pool.register_lora(library / name, name, entry["description"], tags=entry["tags"],
                                       examples=entry["examples"])
    body = {"model": "base", "messages": [{"role": "user", "content": "What is 345 + 210?"}], "max_tokens": 6,
            "temperature": 0}
    cid = httpx.post(f"{url}/v1/chat/completions", json=body, headers=USER, timeout=120).json()["id"]
    before = _count(runtime)
    for bad, status, words in (({"correction": ""}, 400, "correction must be"),
                               ({"correction": "5" * 4001}, 400, "correction"),
                               ({"correction": "555", "score": 3}, 400, "score must be"),
                               ({"correction": "555", "id": "chatcmpl-000000000000000000000000"}, 404, "no completion")):
        r = httpx.post(f"{url}/v1/feedback", json={"id": cid, **bad}, headers=USER, timeout=120)
        assert r.status_code == status and words in r.json()["error"]["message"], (bad, r.text)
    assert _count(runtime) == before
    r = httpx.post(f"{url}/v1/feedback", json={"id": cid, "correction": "555"}, headers=USER, timeout=300)
    assert r.status_code == 200, r.text
    out = r.json()
    experts = sorted(c.name for c in runtime.pool.list() if c.kind == "lora")
    assert out["replay"]["arms"] == out["replay"]["rows"] == len(experts) + 1 and out["arm"] == "(base)"
    assert "arith_add" in out["replay"]["right"] and "reverse_words" not in out["replay"]["right"], out
    rows = [i for i in store_for(runtime.pool.registry).items() if i.completion_id == cid]
    assert sorted(i.arm for i in rows) == sorted(experts + ["(base)"]) and {i.source for i in rows} == {"replay"}
    assert {i.arm for i in rows if i.score == 1.0} == set(out["replay"]["right"])
    assert [i.routed for i in rows if i.arm == "(base)"] == [True]            # base answered the request
    assert _count(runtime) == before + len(experts) + 1


@pytest.mark.real
def test_with_feedback_records_off_nothing_is_kept_and_feedback_is_503(server):
    """MOERGE_FEEDBACK_RECORDS=false: a chat keeps no record (no query text), and /v1/feedback says why it
    cannot help."""
    from starlette.testclient import TestClient

    from moerge.router.feedback import store_for
    from moerge.service.app import create_app
    _, runtime, settings = server
    store = store_for(runtime.pool.registry)
    before = _count(runtime)
    runtime.settings = settings.model_copy(update={"feedback_records": False})
    try:
        with TestClient(create_app(runtime)) as client:
            r = client.post("/v1/chat/completions", headers=USER, json={
                "model": "base", "messages": [{"role": "user", "content": "What is 2 - 1?"}], "max_tokens": 2})
            assert r.status_code == 200, r.text
            cid = r.json()["id"]
            r = client.post("/v1/feedback", json={"id": cid, "score": 1}, headers=USER)
            assert r.status_code == 503 and "MOERGE_FEEDBACK_RECORDS" in r.json()["error"]["message"], r.text
    finally:
        runtime.settings = settings
    assert store.completion(cid) is None and _count(runtime) == before
    assert store.completion(_chat(server[0]).json()["id"]) is not None      # on again: recorded
