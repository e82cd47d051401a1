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
                                    OnlineCalibration, UnknownCompletionError, feedback_score, plan_record)

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
    d = router.route(CAPITAL)      # uppercase scores 0.62 < its learned 0.7: the next arm (prior 0.25) wins
    assert d.chosen == ["reverse_words"], d.detail
