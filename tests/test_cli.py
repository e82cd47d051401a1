"""The CLI registers, lists, shows and removes experts; user errors are one line, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import make_lora


def run(args, env, ok=True):
    proc = subprocess.run([sys.executable, "-m", "moerge.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def cli_env(tmp_path, real_settings):
    return {**os.environ, "MOERGE_HOME": str(real_settings.home), "MOERGE_POOL_DIR": str(tmp_path / "pool"),
            "MOERGE_BUNDLED_POOL": "false", "MOERGE_CONFIG": str(tmp_path / "none.toml")}


@pytest.mark.real
def test_cli_register_list_show_remove(tmp_path, cli_env, base_model_dir):
    adapter = make_lora(base_model_dir, tmp_path / "ad", base_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    out = run(["experts", "register", str(adapter), "--name", "shouty", "--description", "upper-cases text",
               "--example", "make this loud: hello"], cli_env).stdout
    assert "registered" in out and "shouty" in out
    listed = json.loads(run(["experts", "list", "--json"], cli_env).stdout)
    assert [e["name"] for e in listed] == ["shouty"] and listed[0]["has_arrow"]
    shown = json.loads(run(["experts", "show", "shouty", "--json"], cli_env).stdout)
    assert shown["examples"] == ["make this loud: hello"] and shown["rank"] == 4
    run(["experts", "remove", "shouty"], cli_env)
    assert json.loads(run(["experts", "list", "--json"], cli_env).stdout) == []


@pytest.mark.real
def test_cli_errors_are_one_line_without_traceback(tmp_path, cli_env):
    (tmp_path / "empty").mkdir()
    for args, needle in [
        (["experts", "register", str(tmp_path / "empty"), "--name", "x"], "adapter_config.json"),
        (["experts", "show", "ghost"], "no expert named 'ghost'"),
        (["experts", "register", str(tmp_path / "empty"), "--name", "../x"], "path separator"),
        (["experts", "register", "--kind", "model", "--name", "r", "--model", "openai/x"], "API base"),
    ]:
        proc = run(args, cli_env, ok=False)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("Loading")]
        assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_cli_config_prints_effective_settings(tmp_path):
    toml = tmp_path / "moerge.toml"
    toml.write_text('port = 9123\nrouting_method = "embed"\n')
    env = {**os.environ, "MOERGE_CONFIG": str(toml), "MOERGE_ROUTING_METHOD": "arrow"}
    data = json.loads(run(["config", "--json"], env).stdout)
    assert data["port"] == 9123            # from the TOML file
    assert data["routing_method"] == "arrow"  # env wins over the file
