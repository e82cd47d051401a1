"""The `feedback` router and its store: feedback is kept in the registry's database, survives a new
pool object, and moves routing away from an expert that its neighbours' feedback says fails."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from moerge.experts.errors import ExpertError
from moerge.experts.registry import Registry
from moerge.router.base import ExpertScore, Router, RoutingDecision
from moerge.router.feedback import (BASE_ARM, FeedbackCalibration, FeedbackItem, FeedbackRouter, FeedbackStore,
                                    OnlineCalibration, UnknownCompletionError, answer_matches, feedback_score,
                                    plan_record, replay_arms)

LOWER = ["Convert to lower case please: HELLO THERE FRIEND", "Make this text lowercase: THE CAT SAT DOWN",
         "Rewrite in small letters: GOOD MORNING WORLD", "Lower-case this: OPEN THE DOOR NOW",
         "Please lowercase: I LIKE GREEN APPLES", "Put in lower case: WE WALKED HOME LATE"]
LOWER_NEW = "Turn this into lower case letters: MY DOG RUNS FAST"
CAPITAL = "What is the capital city of France?"


class StubRanker(Router):
    """A sequence router with a fixed ranking: 'uppercase' (the near miss) first."""
    name = "stub"
    granularity = "sequence"

    def __init__(self, ranking=(("uppercase", 0.62), ("reverse_words", 0.41), ("count_words", 0.38),
                                ("capital_of", 0.2)), abstain=False):
        self.ranking, self.abstain = ranking, abstain

    def route(self, query, *, task=None):
        experts = [ExpertScore(n, s) for n, s in self.ranking]
        return RoutingDecision("stub", "sequence", experts=experts, chosen=[] if self.abstain else [experts[0].name],
                               abstained=self.abstain)


@pytest.fixture
def registry(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path}/registry.sqlite")
    yield reg
    reg.close()


def _ctx(registry, embedder, root):
    return SimpleNamespace(pool=SimpleNamespace(registry=registry, root=root), embed=embedder.encode)


def _answered(store, cid, query, arm, score=0.6):
    """A completion that was answered by `arm` (an expert or base), recorded as the service does."""
    if arm == BASE_ARM:
        d = RoutingDecision("feedback", "sequence", experts=[ExpertScore("uppercase", score)], abstained=True)
    else:
        d = RoutingDecision("feedback", "sequence", experts=[ExpertScore(arm, score)], chosen=[arm])
    store.record_completion(cid, model="moerge:feedback", method="feedback", query=query, plan=plan_record(d, "adapter"))


def test_store_keeps_feedback_and_it_survives_a_new_registry_object(tmp_path, embedder):
    url = f"sqlite:///{tmp_path}/registry.sqlite"
    reg = Registry(url)
    store = FeedbackStore(reg)
    _answered(store, "chatcmpl-a", LOWER[0], "uppercase")
    item = store.add_feedback("chatcmpl-a", label="bad", embed=embedder.encode)
    assert (item.arm, item.score) == ("uppercase", 0.0) and item.embedding.shape == (384,)
    reg.close()
    reg2 = Registry(url)               # a new process's view of the same database
    try:
        items = FeedbackStore(reg2).items()
        assert [(i.completion_id, i.arm, i.score, i.query) for i in items] == [("chatcmpl-a", "uppercase", 0.0, LOWER[0])]
        assert np.allclose(items[0].embedding, item.embedding)
    finally:
        reg2.close()


def test_bad_feedback_is_refused_and_stores_nothing(registry, embedder):
    store = FeedbackStore(registry)
    _answered(store, "chatcmpl-b", LOWER[0], "uppercase")
    with pytest.raises(UnknownCompletionError) as e:
        store.add_feedback("chatcmpl-nope", score=1.0)
    assert e.value.status == 404
    for kwargs in ({"score": 1.5}, {"score": -0.1}, {"score": float("nan")}, {"label": "meh"}, {},
                   {"score": 1.0, "label": "bad"}):
        with pytest.raises(ExpertError) as e:
            store.add_feedback("chatcmpl-b", **kwargs)
        assert e.value.status == 400, kwargs
    assert store.count() == 0
    assert feedback_score(None, "Correct") == (1.0, "correct") and feedback_score(0.25, None) == (0.25, None)


def test_completion_records_are_bounded_by_count_and_ttl(registry):
    store = FeedbackStore(registry, max_completions=5, completion_ttl_s=3600, prune_every=1000)
    now = time.time()
    for i in range(8):
        _answered(store, f"chatcmpl-{i}", "q", "uppercase")
    store.record_completion("chatcmpl-old", model="auto", method="embed", query="q", plan={"arm": None},
                            now=now - 7200)
    assert store.completion("chatcmpl-old") is None          # past the TTL: not found even before pruning
    store.prune()
    kept = [i for i in range(8) if store.completion(f"chatcmpl-{i}") is not None]
    assert kept == [3, 4, 5, 6, 7]


def test_negative_feedback_on_neighbours_moves_routing_off_the_near_miss(registry, embedder, tmp_path):
    store = FeedbackStore(registry)
    ctx = _ctx(registry, embedder, tmp_path)
    router = FeedbackRouter(base_router=StubRanker(), store=store, explore=False, explore_k=3).fit(ctx)
    assert router.route(LOWER_NEW).chosen == ["uppercase"]          # no feedback: the wrapped router's choice
    for i, q in enumerate(LOWER):                                   # uppercase fails on lower-case requests...
        _answered(store, f"chatcmpl-u{i}", q, "uppercase")
        store.add_feedback(f"chatcmpl-u{i}", score=0.0, embed=embedder.encode)
    for i, q in enumerate(LOWER[:3]):                               # ...and reverse_words worked, sometimes
        _answered(store, f"chatcmpl-r{i}", q, "reverse_words", 0.41)
        store.add_feedback(f"chatcmpl-r{i}", score=1.0 if i < 2 else 0.0, embed=embedder.encode)
    d = router.route(LOWER_NEW)
    assert d.chosen == ["reverse_words"], d.detail
    assert d.detail["arms"]["uppercase"]["n"] >= 4 and d.detail["neighbours"] >= 7
    # a query far from that feedback still goes where the wrapped router sends it
    assert router.route(CAPITAL).chosen == ["uppercase"]
    # a router started later (a restart) learns the same from the stored rows
    again = FeedbackRouter(base_router=StubRanker(), store=FeedbackStore(registry), explore=False).fit(ctx)
    assert again.route(LOWER_NEW).chosen == ["reverse_words"]


def test_failures_at_a_lower_router_score_do_not_spill_onto_a_better_fitting_query(registry, embedder, tmp_path):
    """With score_margin (off by default): uppercase failed on requests the wrapped router scored 0.45
    for it (lower-case requests); a request it scores 0.62 keeps uppercase; at 0.46 the failures count."""
    store = FeedbackStore(registry)
    ctx = _ctx(registry, embedder, tmp_path)
    router = FeedbackRouter(base_router=StubRanker(), store=store, explore=False, score_margin=0.02).fit(ctx)
    for i, q in enumerate(LOWER):
        _answered(store, f"chatcmpl-u{i}", q, "uppercase", score=0.45)
        store.add_feedback(f"chatcmpl-u{i}", score=0.0, embed=embedder.encode)
    d = router.route(LOWER_NEW)
    assert d.chosen == ["uppercase"] and d.detail["arms"]["uppercase"]["weight"] < 0.01, d.detail
    near = FeedbackRouter(base_router=StubRanker(ranking=(("uppercase", 0.46), ("reverse_words", 0.41),
                                                          ("count_words", 0.38))), store=store, explore=False,
                          score_margin=0.02).fit(ctx)
    assert near.route(LOWER_NEW).chosen != ["uppercase"]


def test_every_arm_failing_falls_back_to_base(registry, embedder, tmp_path):
    store = FeedbackStore(registry)
    router = FeedbackRouter(base_router=StubRanker(), store=store, explore=False, explore_k=2).fit(
        _ctx(registry, embedder, tmp_path))
    for i, q in enumerate(LOWER):
        for arm in ("uppercase", "reverse_words"):
            _answered(store, f"chatcmpl-{arm}{i}", q, arm)
            store.add_feedback(f"chatcmpl-{arm}{i}", label="bad", embed=embedder.encode)
    d = router.route(LOWER_NEW)
    assert d.abstained and d.chosen == [] and set(d.detail["arms"]) == {"uppercase", "reverse_words", BASE_ARM}


def test_thompson_exploration_is_bounded_and_deterministic(registry, embedder, tmp_path):
    store = FeedbackStore(registry)
    router = FeedbackRouter(base_router=StubRanker(), store=store, explore=True, explore_k=2).fit(
        _ctx(registry, embedder, tmp_path))
    prompts = [f"{q} #{i}" for i in range(5) for q in LOWER]
    chosen = [tuple(router.route(p).chosen) for p in prompts]
    assert {c[0] if c else BASE_ARM for c in chosen} <= {"uppercase", "reverse_words", BASE_ARM}
    assert len(set(chosen)) >= 2                              # it does explore
    assert chosen == [tuple(router.route(p).chosen) for p in prompts]   # same state, same query: same arm


def test_answer_matches_is_exact_up_to_spacing_a_final_period_and_json_form():
    assert answer_matches("  555 ", "555") and answer_matches("Paris.", "Paris")
    assert answer_matches("the  cat\nsat", "the cat sat")
    assert answer_matches('{"name": "Ann", "age": 3}', '{"age":3,"name":"Ann"}')
    assert not answer_matches('{"name": "Ann"}', '{"name":"Bob"}')
    assert not answer_matches("HELLO THERE", "hello there")          # case is the answer for some tasks
    assert not answer_matches("555 is the sum", "555") and not answer_matches("", "555")


def test_replay_arms_puts_the_recorded_top_first_bounded_then_base():
    plan = {"top": [["uppercase", 0.6], ["gone", 0.5], ["reverse_words", 0.4]]}
    experts = ["capital_of", "count_words", "reverse_words", "uppercase"]
    assert replay_arms(plan, experts) == ["uppercase", "reverse_words", "capital_of", "count_words", BASE_ARM]
    assert replay_arms(plan, experts, max_arms=2) == ["uppercase", "reverse_words", BASE_ARM]


def _fake_replay(right: set[str], calls: list):
    """An engine stand-in: each arm answers "ok" if it is in `right`, else "nope" (the real engine's replay
    is tested in tests/service/test_feedback_api.py)."""
    def answer(query, arms):
        calls.append((query, list(arms)))
        return {a: "ok" if a in right else "nope" for a in arms}
    return answer


def test_corrections_score_every_arm_and_route_to_one_the_wrapped_router_ranks_low(registry, embedder, tmp_path):
    """Only capital_of (4th of the wrapped router's ranking, outside explore_k=2) answers lower-case
    requests right: score feedback on the arms routed to could never find it; corrections do, and
    the rows of arms that did not answer leave the per-expert priors alone."""
    store = FeedbackStore(registry)
    router = FeedbackRouter(base_router=StubRanker(), store=store, explore=False, explore_k=2).fit(
        _ctx(registry, embedder, tmp_path))
    experts = ["uppercase", "reverse_words", "count_words", "capital_of"]
    calls = []
    for i, q in enumerate(LOWER):
        _answered(store, f"chatcmpl-c{i}", q, "uppercase")
        out = store.add_correction(f"chatcmpl-c{i}", "ok", _fake_replay({"capital_of"}, calls), experts=experts,
                                   embed=embedder.encode)
        assert out["right"] == ["capital_of"] and out["replayed"] == 5 and out["score"] == 0.0
        assert out["arm"] == "uppercase" and len(out["ids"]) == 5
    assert calls[0] == (LOWER[0], ["uppercase", "capital_of", "count_words", "reverse_words", BASE_ARM])
    rows = store.items()
    assert len(rows) == 5 * len(LOWER) and {r.source for r in rows} == {"replay"}
    assert sorted(r.arm for r in rows if r.routed) == ["uppercase"] * len(LOWER)
    d = router.route(LOWER_NEW)
    assert d.chosen == ["capital_of"], d.detail
    arm = d.detail["arms"]["capital_of"]
    assert d.detail["neighbours"] >= 4 and arm["n"] == arm["successes"] == d.detail["neighbours"], d.detail
    assert router.route(CAPITAL).chosen == ["uppercase"]              # far from the corrections: unchanged
    # priors and thresholds move only for the arm that answered (uppercase), from its own rows
    assert set(router.calibration.arms) == {"uppercase"}
    assert FeedbackCalibration.from_items(rows, min_count=5).arms.keys() == {"uppercase"}
    # a client's own score for the answering arm is kept in place of that arm's replay
    _answered(store, "chatcmpl-own", LOWER[0], "uppercase")
    out = store.add_correction("chatcmpl-own", "ok", _fake_replay({"uppercase"}, calls), experts=experts,
                               label="bad")
    assert out["score"] == 0.0 and out["right"] == ["uppercase"]
    own = [r for r in store.items() if r.completion_id == "chatcmpl-own"]
    assert sorted((r.arm, r.source, r.score) for r in own if r.arm == "uppercase") == [("uppercase", "api", 0.0)]


def test_a_bad_correction_or_a_failed_replay_stores_nothing(registry, embedder):
    store = FeedbackStore(registry)
    _answered(store, "chatcmpl-x", LOWER[0], "uppercase")
    experts = ["uppercase", "capital_of"]
    calls = []
    for correction, kwargs in (("", {}), ("   ", {}), ("x" * 4001, {}), ("ok", {"score": 2.0}),
                               ("ok", {"score": 1.0, "label": "bad"})):
        with pytest.raises(ExpertError) as e:
            store.add_correction("chatcmpl-x", correction, _fake_replay(set(), calls), experts=experts, **kwargs)
        assert e.value.status == 400, (correction[:8], kwargs)
    with pytest.raises(UnknownCompletionError):
        store.add_correction("chatcmpl-nope", "ok", _fake_replay(set(), calls), experts=experts)
    assert calls == []                                    # nothing was replayed for a refused correction

    def broken(query, arms):
        raise RuntimeError("engine died")
    with pytest.raises(RuntimeError):
        store.add_correction("chatcmpl-x", "ok", broken, experts=experts)
    with pytest.raises(RuntimeError, match="no text"):
        store.add_correction("chatcmpl-x", "ok", lambda q, arms: {"uppercase": "ok"}, experts=experts)
    assert store.count() == 0


def _item(i, arm, score, arm_score):
    return FeedbackItem(i, f"c{i}", arm, score, None, arm_score)


def test_calibration_from_feedback_sets_thresholds_and_online_steps_are_bounded():
    items = [_item(i, "uppercase", 1.0, 0.7 + 0.01 * i) for i in range(4)] + \
            [_item(10 + i, "uppercase", 0.0, 0.5 + 0.01 * i) for i in range(4)]
    cal = FeedbackCalibration.from_items(items, min_count=5)
    st = cal.arms["uppercase"]
    assert st.n == 8 and st.prior == pytest.approx(5 / 10) and 0.53 < st.threshold < 0.7
    online = OnlineCalibration(FeedbackCalibration(), min_count=5, max_step=0.05)
    for it in [_item(i, "count_words", 0.0, 0.5) for i in range(4)]:
        online.update(it)
    assert "count_words" not in online.arms                  # nothing moves before min_count
    before = 0.5
    for k, it in enumerate([_item(i, "count_words", 0.0, 0.5) for i in range(4, 12)]):
        online.update(it)
        now = online.arms["count_words"].prior
        assert abs(now - before) <= 0.05 + 1e-9               # one step at most max_step
        before = now
    assert online.arms["count_words"].prior < 0.2


def test_learned_threshold_lowers_an_expert_below_it(registry, embedder, tmp_path):
    cal_path = tmp_path / "cal.json"
    FeedbackCalibration({"uppercase": __import__("moerge.router.feedback", fromlist=["ArmStats"]).ArmStats(
        prior=0.5, threshold=0.7, n=10, successes=5)}).save(cal_path)
    router = FeedbackRouter(base_router=StubRanker(), store=FeedbackStore(registry), explore=False,
                            calibration_path=cal_path).fit(_ctx(registry, embedder, tmp_path))
    # far from all feedback, nothing learned applies: a threshold learned on other phrasings does not carry
    assert router.route(CAPITAL).chosen == ["uppercase"]
    store = router.store
    _answered(store, "chatcmpl-cap", "What is the capital city of Spain?", "count_words", 0.38)
    store.add_feedback("chatcmpl-cap", score=0.0, embed=embedder.encode)
    d = router.route(CAPITAL)      # near feedback: uppercase scores 0.62 < its learned 0.7, the next arm wins
    assert d.detail["neighbours"] == 1 and d.chosen == ["reverse_words"], d.detail


def test_calibrate_from_feedback_cli_writes_per_expert_priors_and_thresholds(tmp_path, embedder):
    import json
    import os
    import subprocess
    import sys
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    reg = Registry(f"sqlite:///{pool_dir}/registry.sqlite")
    store = FeedbackStore(reg)
    for i in range(6):        # uppercase works when its score is high, fails when low
        ok = i % 2 == 0
        d = RoutingDecision("glider-global", "sequence", experts=[ExpertScore("uppercase", 0.7 if ok else 0.5)],
                            chosen=["uppercase"])
        store.record_completion(f"chatcmpl-{i}", model="auto", method="glider-global", query=LOWER[i],
                                plan=plan_record(d, "adapter"))
        store.add_feedback(f"chatcmpl-{i}", score=1.0 if ok else 0.0)
    reg.close()
    env = {**os.environ, "MOERGE_POOL_DIR": str(pool_dir), "MOERGE_BUNDLED_POOL": "false",
           "MOERGE_CONFIG": str(tmp_path / "none.toml")}
    proc = subprocess.run([sys.executable, "-m", "moerge.cli", "calibrate", "--from-feedback", "--min-count", "5"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((pool_dir / "feedback_calibration.json").read_text())
    st = data["arms"]["uppercase"]
    assert st["n"] == 6 and st["successes"] == 3 and 0.5 < st["threshold"] < 0.7, data
    # the router of a pool finds that file next to its registry and applies it
    reg = Registry(f"sqlite:///{pool_dir}/registry.sqlite")
    try:
        router = FeedbackRouter(base_router=StubRanker(), store=FeedbackStore(reg), explore=False).fit(
            _ctx(reg, embedder, pool_dir))
        assert router.calibration.arms["uppercase"].threshold == pytest.approx(st["threshold"])
    finally:
        reg.close()


@pytest.mark.real
@pytest.mark.slow
def test_real_library_feedback_on_a_held_out_task_moves_routing_off_the_near_miss(real_settings, tmp_path_factory):
    """lowercase has no expert; glider-global sends it to `uppercase`, which does the opposite. Six
    feedback-stream prompts (training content, phrasings disjoint from the evaluation ones) are
    answered by that near miss on the real base model and scored by the task's scorer; that
    feedback must move the `feedback` router's choice for fresh lowercase prompts off `uppercase`."""
    from moerge.eval.feedback import stream_samples
    from moerge.eval.harness import EVAL_SEED
    from moerge.models.generation import SamplingParams
    from moerge.router.base import make_router
    from moerge.startup import start
    from moerge.tasks import get_task

    system = start(real_settings, executor="reference", pool_dir=tmp_path_factory.mktemp("fb-libpool"),
                   bundled=True, progress=lambda m: None)
    try:
        ctx, task = system.router_ctx, get_task("lowercase")
        store = FeedbackStore(system.pool.registry)
        router = make_router("feedback", ctx, explore=False, store=store)
        fresh = [s.prompt for s in task.samples(3, EVAL_SEED, "eval", "template")]
        before = [router.route(p).chosen for p in fresh]
        assert sum(c == ["uppercase"] for c in before) >= 2, before     # the near miss, as in the report
        stream = stream_samples("lowercase", 6)
        pinned = [RoutingDecision("pinned", "sequence", experts=[ExpertScore("uppercase", 1.0)], chosen=["uppercase"])
                  for _ in stream]
        gens = system.generate_many([system.encode([{"role": "user", "content": s.prompt}]) for s in stream],
                                    [SamplingParams(max_tokens=24, temperature=0.0)] * len(stream),
                                    [system.plan(d) for d in pinned])
        scores = [float(task.score(g.text, s.answer)) for g, s in zip(gens, stream)]
        assert sum(scores) <= 1, [g.text for g in gens]                  # it really fails on this task
        for i, (s, d, score) in enumerate(zip(stream, pinned, scores)):
            store.record_completion(f"chatcmpl-real{i}", model="uppercase", method="pinned", query=s.prompt,
                                    plan=plan_record(d, "adapter"))
            store.add_feedback(f"chatcmpl-real{i}", score=score, embed=ctx.embed)
        after = [router.route(p) for p in fresh]
        seen = [(d.chosen, d.detail["neighbours"], d.detail["arms"].get("uppercase")) for d in after]
        informed = [d for d in after if d.detail["arms"].get("uppercase", {}).get("n", 0) >= 3]
        assert len(informed) >= 2, seen                  # the stream is near most fresh phrasings...
        assert all(d.chosen != ["uppercase"] for d in informed), seen       # ...and there it moved off the near miss
        assert sum(d.chosen == ["uppercase"] for d in after) < sum(c == ["uppercase"] for c in before), seen
    finally:
        system.shutdown()
