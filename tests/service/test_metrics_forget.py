"""Per-expert series leave /metrics when their expert is removed: under churn of expert names they would
otherwise grow without end, in the service's memory and in Prometheus."""

from __future__ import annotations

from prometheus_client import generate_latest

from moerge.service.ops import Metrics


def _experts_in(metrics: Metrics) -> set[str]:
    text = generate_latest(metrics.registry).decode()
    return {line.split('expert="', 1)[1].split('"', 1)[0] for line in text.splitlines()
            if 'expert="' in line and not line.startswith("#")}


def test_forgetting_an_expert_drops_its_series_and_keeps_the_others():
    m = Metrics()
    m.count_decision("arrow", ["a", "b"], abstained=False)
    m.count_decision("glider", ["a"], abstained=False)
    m.count_layer_usage({0: {"a": 0.7, "b": 0.3}, 1: {"a": 1.0}})
    assert _experts_in(m) == {"a", "b"}
    assert m.forget_expert("a") == 5          # 2 decisions, 1 requests-per-expert, 2 layer-usage series
    assert _experts_in(m) == {"b"}
    assert m.forget_expert("a") == 0
    m.count_decision("arrow", ["a"], abstained=False)   # a name registered again starts from zero
    text = generate_latest(m.registry).decode()
    assert 'moerge_expert_requests_total{expert="a"} 1.0' in text
    assert 'moerge_expert_requests_total{expert="b"} 1.0' in text


def test_churned_names_leave_no_series_behind():
    m = Metrics()
    for i in range(200):
        name = f"churn-{i}"
        m.count_decision("arrow", [name], abstained=False)
        m.count_layer_usage({layer: {name: 1.0} for layer in range(30)})
        m.forget_expert(name)
    assert _experts_in(m) == set()
    assert not m._by_expert
