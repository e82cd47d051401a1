"""report.md with two shifts: the template-vs-content table and issue 12's aims, computed from
the numbers (a synthetic report, so every branch can be checked)."""

from __future__ import annotations

from moerge.eval.report import expert_aims, shift_table, write_report
from moerge.tasks import HELD_IN


def _method(accs: dict[str, float], **extra) -> dict:
    tasks = {t: {"accuracy": a, "n": 50, "chosen_counts": {}} for t, a in accs.items()}
    return {"tasks": tasks, "held_in": sum(accs.values()) / len(accs), "held_out": None, **extra}


def _report(oracle_template: float, oracle_content: float, base: float = 0.0, top1: float = 0.99,
            abstain: float = 1.0) -> dict:
    tasks = list(HELD_IN)
    shifts = {}
    for shift, ora in (("template", oracle_template), ("content", oracle_content)):
        shifts[shift] = {"methods": {"base": _method({t: base for t in tasks}),
                                     "oracle": _method({t: ora for t in tasks}),
                                     "glider-global": _method({t: ora for t in tasks}, routing_top1_held_in=top1)}}
    return {"config": {"n": 50, "tasks": tasks, "eval_seed": 1, "shifts": ["template", "content"]},
            "shifts": shifts, "methods": shifts["template"]["methods"],
            "out_of_domain": {"glider-global": {"abstain_rate": abstain}}}


def test_aims_met_when_experts_hold_up_on_new_content():
    lines = expert_aims(_report(0.95, 0.9))
    assert len(lines) == 4 and all(line.endswith("(met)") or "met)" in line for line in lines), lines
    assert not any("missed" in line for line in lines)


def test_each_aim_can_be_missed():
    assert "missed" in expert_aims(_report(0.95, 0.9, base=0.6))[0]            # gain 30 < 40
    assert "missed" in expert_aims(_report(0.8, 0.8))[1]                       # mean 80 < 85
    assert "missed" in expert_aims(_report(1.0, 0.86))[2]                      # drop 14 > 10
    assert "missed" in expert_aims(_report(0.95, 0.9, top1=0.9))[3]
    assert "missed" in expert_aims(_report(0.95, 0.9, abstain=0.9))[3]


def test_shift_table_and_report_sections(tmp_path):
    report = _report(0.95, 0.7)
    table = shift_table(report)
    assert "| oracle | 95.0 | 70.0 | 25.0 |" in table
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Template vs content" in md and "## Summary (content shift)" in md and "## Summary (template shift)" in md
    assert "## Aims for the experts (content shift)" in md
    assert (tmp_path / "template_vs_content.png").stat().st_size > 10_000
