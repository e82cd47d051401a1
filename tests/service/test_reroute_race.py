"""A routed request whose decision names an expert removed before its plan is made is routed
again, not answered with a 404 about an expert the client never asked for (found by the locust
load run: `moerge:arrow` got "no expert named 'churn'" while `churn` was registered and removed
in a loop). A pinned request for a removed expert keeps its 404."""

from __future__ import annotations

import pytest

from moerge.experts.bundled import LIBRARY
from moerge.experts.errors import UnknownExpertError


@pytest.fixture(scope="module")
def runtime(real_settings, tmp_path_factory):
    from moerge.service.runtime import Runtime
    from moerge.startup import start
    # other replicas' changes are read only when asked (no poll within a test)
    system = start(real_settings.model_copy(update={"pool_poll_s": 3600.0}), executor="reference", pool_dir=tmp_path_factory.mktemp("pool"), bundled=True,
                   with_writer=False, progress=lambda m: None)
    yield Runtime(system)
    system.shutdown()


def _remove_after_routing(runtime, monkeypatch, name):
    """The race, made deterministic: `name` is removed right after the first routing decision."""
    real = runtime.decide
    calls = []

    def decide(model, messages):
        d = real(model, messages)
        calls.append([s.name for s in d.experts])
        if len(calls) == 1:
            runtime.pool.remove(name)
        return d
    monkeypatch.setattr(runtime, "decide", decide)
    return calls


@pytest.mark.real
def test_a_routed_request_is_routed_again_when_an_expert_vanishes(runtime, monkeypatch):
    runtime.pool.register_lora(LIBRARY / "capital_of", "churn", "Names the capital city of a country.")
    calls = _remove_after_routing(runtime, monkeypatch, "churn")
    before = runtime.rerouted
    rp = runtime.plan("moerge:arrow", [{"role": "user", "content": "What is the capital of Peru?"}])
    assert "churn" in calls[0]                      # the first decision named it
    assert runtime.rerouted == before + 1 and len(calls) == 2
    assert "churn" not in [r.name for r in rp.execution.experts]
    assert rp.execution.kind == "token_mixture"


@pytest.mark.real
def test_a_pinned_request_for_a_removed_expert_keeps_its_404(runtime, monkeypatch):
    runtime.pool.register_lora(LIBRARY / "capital_of", "churn2", "Names the capital city of a country.")
    _remove_after_routing(runtime, monkeypatch, "churn2")
    before = runtime.rerouted
    with pytest.raises(UnknownExpertError, match="churn2"):
        runtime.plan("churn2", [{"role": "user", "content": "What is the capital of Peru?"}])
    assert runtime.rerouted == before


@pytest.mark.real
def test_a_routed_request_is_routed_again_when_another_replica_removed_the_expert(runtime):
    """Replica B (another pool object on the same registry and folder) removes an expert; this
    replica's card index has not polled yet, so the embedding router still picks it. The retry reads
    the other replica's changes first; routing again with the stale index would pick it every time.
    (Token-level routers list the pool afresh for each request, so they only meet the local race.)"""
    from moerge.experts.pool import open_pool
    ask = [{"role": "user", "content": "Which city is the capital of Peru?"}]
    runtime.pool.register_lora(LIBRARY / "capital_of", "churn3", "Names the capital city of a country.",
                               examples=["What is the capital of Peru?"])
    other = open_pool(runtime.system.settings)
    try:
        other.remove("churn3")
    finally:
        other.close()
    d = runtime.decide("moerge:embed", ask)
    assert "churn3" in d.chosen, d.chosen            # this replica has not heard yet, and picks it
    before = runtime.rerouted
    rp = runtime.plan("moerge:embed", ask)
    assert runtime.rerouted == before + 1
    assert "churn3" not in rp.decision.chosen, rp.decision.chosen
