"""report.md's composed-task table: each method's mean over the composed tasks against the best single
expert's (eval/report.py), from a report.json as the harness writes it."""

from __future__ import annotations

from moerge.eval.harness import _summarise
from moerge.eval.report import composed_table


def _method(accs: dict[str, float]) -> dict:
    res = {"tasks": {t: {"accuracy": a} for t, a in accs.items()}}
    _summarise(res, list(accs))
    return res


def test_composed_table_compares_each_method_with_the_best_single_expert():
    tasks = ["uppercase", "reverse_then_upper", "add_then_words"]
    chain = _method({"uppercase": 0.9, "reverse_then_upper": 0.5, "add_then_words": 0.3})
    best = _method({"reverse_then_upper": 0.1, "add_then_words": 0.0})
    assert abs(chain["composed"] - 0.4) < 1e-9 and chain["held_in"] == 0.9 and chain["held_out"] is None
    report = {"config": {"tasks": tasks}, "methods": {"chain": chain, "best-single": best}}
    rows = composed_table(report).splitlines()
    assert rows[0].startswith("| method | composed (mean) | vs best single expert | reverse_then_upper | add_then_words |")
    assert rows[2] == "| chain | 40.0 | +35.0 | 50.0 | 30.0 |"
    assert rows[3] == "| best-single | 5.0 | +0.0 | 10.0 | 0.0 |"
    assert composed_table({"config": {"tasks": ["uppercase"]}, "methods": {"chain": chain}}) == ""


def test_verify_table_counts_what_the_check_did_per_task():
    from moerge.eval.report import verify_table
    res = _method({"uppercase": 0.9, "lowercase": 0.0})
    res["tasks"]["uppercase"]["verify"] = {"passed": 48, "rejected": 1, "not run: no expert chosen": 1}
    res["tasks"]["lowercase"]["verify"] = {"rejected": 40, "passed": 6, "not run": 4}
    report = {"config": {"tasks": ["uppercase", "lowercase"]},
              "methods": {"verify": res, "base": _method({"uppercase": 0.0, "lowercase": 0.0})}}
    rows = verify_table(report).splitlines()
    assert rows[2] == "| verify | uppercase | held-in | 1 | 48 | 1 | 90.0 |"
    assert rows[3] == "| verify | lowercase | held-out | 40 | 6 | 4 | 0.0 |"
    assert len(rows) == 4                     # base ran no check: no rows
    assert verify_table({"config": {"tasks": []}, "methods": {"base": _method({})}}) == ""
