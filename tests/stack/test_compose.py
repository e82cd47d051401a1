"""The compose stack's files, without Docker: docker-compose.yml validates (`docker compose config`, or Debian's
`docker-compose`, which needs no daemon), every file it mounts is in the repository, Prometheus's compose
targets are compose services, and the Grafana dashboard parses and reads only metrics that exist.

The image is built and run with podman by `make image` (scripts/image.sh), outside `make test`;
tests/stack/test_stack.py runs the same topology natively, and checks the dashboard's metrics against what that stack's targets export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "moerge.json"
TARGETS = ROOT / "deploy" / "prometheus" / "targets-compose"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}
EXPORTER_PREFIXES = ("vllm:", "nginx_", "pg_", "prometheus_")


def family(metric: str) -> str:
    """A sample name's family: what Prometheus's metadata and prometheus_client's parser call it."""
    return re.sub(r"_(total|bucket|sum|count|created)$", "", metric)


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(panels(p) if p.get("panels") else [])
    return out


def dashboard_metrics(dashboard: dict) -> set[str]:
    """The metric names the dashboard's PromQL expressions read (strings, label matchers, ranges and
    grouping clauses removed; a name followed by '(' is a function)."""
    names = set()
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            expr = re.sub(r'"[^"]*"', "", target["expr"])
            expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
            expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
            for m in re.finditer(r"(?<![\w:.$])[A-Za-z_:][\w:]*", expr):
                if not expr[m.end():].lstrip().startswith("(") and m.group(0).lower() not in PROMQL_WORDS:
                    names.add(m.group(0))
    return names


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_file_validates_and_mounts_only_files_in_the_repository():
    command = compose_command()
    if command is None:     # scripts/stack.sh install puts Debian's docker-compose here
        subprocess.run(["bash", str(ROOT / "scripts" / "stack.sh"), "install"], capture_output=True, timeout=900)
        command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed, and `scripts/stack.sh install` "
                    "could not install Debian's docker-compose")
    checked = subprocess.run([*command, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=120,
                             cwd=ROOT)
    assert checked.returncode == 0, f"{' '.join(command)} config: {checked.stderr}"
    config = yaml.safe_load(checked.stdout)
    services = config["services"]
    assert {"postgres", "vllm", "moerge-a", "moerge-b", "nginx", "prometheus", "grafana", "nginx-exporter",
            "postgres-exporter"} <= services.keys()
    for name in ("moerge-a", "moerge-b"):
        env = services[name]["environment"]
        assert env["MOERGE_DATABASE_URL"].startswith("postgresql+psycopg://") and env["MOERGE_POOL_DIR"] == "/pool"
    binds = [v for s in services.values() for v in s.get("volumes", [])
             if isinstance(v, str) and v.startswith("/") or isinstance(v, dict) and v.get("type") == "bind"]
    for bind in binds:
        source = Path(bind.split(":")[0] if isinstance(bind, str) else bind["source"])
        assert source.exists() and ROOT in source.parents, f"{bind}: not a file in the repository"


def test_prometheus_compose_targets_are_services_of_the_compose_file():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    jobs = [c["job_name"] for c in yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())["scrape_configs"]]
    for job in jobs:
        groups = json.loads((TARGETS / f"{job}.json").read_text())
        hosts = [t.split(":")[0] for g in groups for t in g["targets"]]
        assert hosts and all(h in services or h == "localhost" for h in hosts), (job, hosts)


def test_dashboard_parses_and_reads_only_metrics_that_exist():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from moerge.service.ops import Metrics

    dashboard = json.loads(DASHBOARD.read_text())
    used = dashboard_metrics(dashboard)
    metrics = Metrics()
    metrics.watch_engines(lambda: [])     # the vLLM servers executor's moerge_engine_* families
    exported = {family(f.name) for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    ours = {m for m in used if m.startswith("moerge_")}
    assert len(ours) >= 8 and {m for m in ours if family(m) not in exported} == set()
    # the exporters' and vLLM's names are checked against the native stack's targets (test_stack.py)
    assert {m for m in used - ours if m != "up" and not m.startswith(EXPORTER_PREFIXES)} == set()
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert all(t["datasource"]["uid"] == uid for p in panels(dashboard) for t in p.get("targets", []))
    assert {"moerge_routing_decisions_total", "moerge_routing_abstain_total", "moerge_layer_expert_usage_total",
            "moerge_inflight_requests", "moerge_request_seconds_bucket"} <= used


def _bytes(size) -> int:
    """A compose size ("1gb", "512m", 268435456) in bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(size).strip().lower())
    assert m, f"not a compose size: {size!r}"
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)]


def test_services_running_vllm_get_the_shared_memory_it_needs():
    """vLLM's engine asks for 160 MiB of /dev/shm when it starts; a container gets 64 MB unless told otherwise.
    Running the image with podman (scripts/image.sh smoke) failed exactly so before shm_size was set."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("vllm", "moerge-a", "moerge-b"):
        assert _bytes(services[name].get("shm_size", 64 << 20)) >= 256 << 20, name
