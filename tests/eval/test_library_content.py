"""The bundled library on the `content` shift (docs/TASKS.md): content no expert trained on, under
phrasings no expert trained on. Each expert must beat the base model by at least 30 points.

This is issue 12's aim, and the bundled library does not meet it yet: on the content shift
(n = 50, docs/results/shifts/report.md) uppercase gains 2 points and sort_numbers 18. The
test over all 12 is marked `aim`, so `make test` leaves it out and `make aims` runs it (and fails,
today). `make test` runs the same check on the experts trained for the skill: those whose manifest
records the content-pools-v1 recipe (docs/TASKS.md), chosen from the manifests, not by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moerge.experts.build import recorded_recipe
from moerge.experts.bundled import LIBRARY
from moerge.tasks import HELD_IN

SKILL_TRAINED = [t for t in HELD_IN if recorded_recipe(LIBRARY / t) == "content-pools-v1"]


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.aim
def test_every_expert_beats_base_by_30_points_on_new_content(tmp_path, real_settings):
    _beats_base_on_new_content(tmp_path, real_settings, HELD_IN)


@pytest.mark.real
@pytest.mark.slow
def test_every_expert_trained_on_the_content_pools_beats_base_by_30_points_on_new_content(tmp_path, real_settings):
    assert len(SKILL_TRAINED) >= 5, SKILL_TRAINED          # the library's retrained experts (library.md)
    _beats_base_on_new_content(tmp_path, real_settings, SKILL_TRAINED)


def _beats_base_on_new_content(tmp_path, real_settings, tasks):
    out = tmp_path / "eval"
    env = {**os.environ, "MOERGE_HOME": str(real_settings.home), "MOERGE_CONFIG": str(tmp_path / "none.toml")}
    args = [sys.executable, "-m", "moerge.cli", "eval", "--shift", "content", "--n", "10", "--out", str(out),
            "--methods", "base", "--methods", "oracle"]
    for t in tasks:
        args += ["--tasks", t]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["shifts"] == ["content"]
    methods = report["shifts"]["content"]["methods"]
    assert methods["oracle"]["shift"] == "content"
    gains = {t: methods["oracle"]["tasks"][t]["accuracy"] - methods["base"]["tasks"][t]["accuracy"] for t in tasks}
    assert sorted(methods["oracle"]["tasks"]) == sorted(tasks)
    assert all(methods["oracle"]["tasks"][t]["n"] == 10 for t in tasks)
    weak = {t: round(g, 2) for t, g in gains.items() if g < 0.30}
    assert not weak, f"experts less than 30 points above base on new content: {weak}"
    assert "(content shift)" in (out / "report.md").read_text()
