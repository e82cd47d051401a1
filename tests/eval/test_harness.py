"""`moerge eval --quick` runs every method end to end on the real library and writes the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moerge.plan import ExecutionPlan, ExpertRef
from moerge.tasks import HELD_IN, HELD_OUT


def test_plan_signature_separates_plans_and_merges_equal_ones():
    x = ExpertRef("x", "a" * 64, "/p/x", 4)
    x2 = ExpertRef("x", "b" * 64, "/p/x2", 4)           # x re-registered: a new version
    y = ExpertRef("y", "c" * 64, "/p/y", 4)
    one = ExecutionPlan("adapter", (x,), (1.0,))
    assert one.signature() == ExecutionPlan("adapter", (x,), (1.0,), engine="vllm").signature()
    assert one.signature() != ExecutionPlan("adapter", (x2,), (1.0,)).signature()
    assert ExecutionPlan("base").signature() != one.signature()
    tok = ExecutionPlan("token_mixture", (x, y), gate_set="arrow", gate_mode="arrow", bias=(0.0, 1.0))
    assert tok.signature() != ExecutionPlan("token_mixture", (x, y), gate_set="arrow", gate_mode="arrow",
                                            bias=(0.0, 2.0)).signature()
    assert tok.signature() != ExecutionPlan("token_mixture", (x, y), gate_set="arrow", gate_mode="arrow",
                                            bias=(0.0, 1.0), top_k=1).signature()


# `make test` runs the quick evaluation on four tasks (three held-in: numbers, text, a format; one
# held-out) to keep within the CI budget; `make test-long` runs it on all 16
BOUNDED_TASKS = ("arith_add", "uppercase", "date_iso_to_us", "lowercase")


@pytest.mark.real
@pytest.mark.slow
def test_quick_eval_writes_report_tables_and_plots(tmp_path, real_settings):
    out = tmp_path / "eval"
    env = {**os.environ, "MOERGE_HOME": str(real_settings.home), "MOERGE_CONFIG": str(tmp_path / "none.toml")}
    tasks = HELD_IN + HELD_OUT if os.environ.get("MOERGE_TEST_LONG") else list(BOUNDED_TASKS)
    # the template shift here; the content shift of the real library is tests/eval/test_library_content.py
    args = [a for t in tasks for a in ("--tasks", t)]
    proc = subprocess.run([sys.executable, "-m", "moerge.cli", "eval", "--quick", "--out", str(out),
                           "--shift", "template", *args], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    methods = report["methods"]
    for m in ("base", "oracle", "merge-linear", "merge-ties", "merge-cat", "retrieval", "embed", "glider-global",
              "arrow", "phatgoose", "glider"):
        assert m in methods, m
        assert 0.0 <= methods[m]["held_in"] <= 1.0 and 0.0 <= methods[m]["held_out"] <= 1.0
        assert sorted(methods[m]["tasks"]) == sorted(tasks)
    assert methods["oracle"]["held_in"] > methods["base"]["held_in"]      # the experts do help
    assert methods["oracle"]["routing_top1_held_in"] == 1.0
    # every plan vLLM serves ran there (fp32); TIES (a dense delta) in the reference engine
    for m in ("oracle", "base", "arrow", "phatgoose", "glider", "merge-linear", "merge-cat", "embed"):
        assert methods[m]["engines"] == ["vllm"], m
    assert methods["merge-ties"]["engines"] == ["reference"]
    assert report["cost"]["generations_by_engine"]["vllm"] > 0
    assert report["cost"]["generations_by_engine"]["reference"] > 0
    assert "## Aims" in (out / "report.md").read_text()
    assert "embed" in report["out_of_domain"] and "arrow" in report["out_of_domain"]
    for png in ("held_in_vs_held_out.png", "routing_heatmap.png", "layer_routing_mass.png"):
        assert (out / png).stat().st_size > 10_000
    md = (out / "report.md").read_text()
    assert "| glider-global |" in md and "held-out" in md
    # a second run is served from the generation cache (an interrupted evaluation resumes): `make test-long`;
    # the bounded form leaves it out, as it starts the engines again (about 50 s of the test's 176 s here)
    if not os.environ.get("MOERGE_TEST_LONG"):
        return
    proc = subprocess.run([sys.executable, "-m", "moerge.cli", "eval", "--quick", "--out", str(out),
                           "--methods", "oracle", "--shift", "template", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0
    again = json.loads((out / "report.json").read_text())
    assert again["cost"]["cache_misses"] == 0
