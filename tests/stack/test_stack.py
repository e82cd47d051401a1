"""The native stack (scripts/stack.sh: PostgreSQL, a vLLM OpenAI server, two moerge replicas on one pool,
nginx, Prometheus and the exporters, all on loopback), started once for this module.

An expert registered through the balancer on one replica is routed by the other within the stated time and
removed everywhere; two replicas registering one name at once leave one winner and a 409; Prometheus scrapes
every part; the dashboard's queries use only metrics the stack exports; a replica killed mid-traffic costs only
the requests it had in flight, which fail instead of hanging; `stop` leaves no process behind.

The tests run in file order: the kill and the stop come last. The stack's start time is printed (-s)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.helpers import make_lora

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "scripts" / "stack.sh"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "moerge.json"
BINARIES = ("nginx", "prometheus", "prometheus-nginx-exporter", "prometheus-postgres-exporter")
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
POLL_S = 1.0                   # MOERGE_POOL_POLL_S, moerge's default
STATED_S = POLL_S + 0.75       # docs/deployment.md: another replica's change is served within this
PIRATE = "Translates English sentences into pirate speak, arr."
PIRATE_PROMPT = "Say this like a pirate would: good morning"

pytestmark = [pytest.mark.real, pytest.mark.slow]


class Stack:
    def __init__(self, folder: Path, env: dict[str, str]):
        self.folder = folder
        self.env = env
        self.lb = env["BALANCER_URL"]
        self.replicas = {"a": env["REPLICA_A_URL"], "b": env["REPLICA_B_URL"]}
        self.prometheus = env["PROMETHEUS_URL"]

    def replica_at(self, upstream: str) -> str | None:
        """'a' or 'b', from nginx's X-Moerge-Upstream header (the last address it tried); None without one."""
        last = upstream.split(",")[-1].strip()
        return next((k for k, url in self.replicas.items() if last and url.endswith("//" + last)), None)

    def pgid(self, part: str) -> int:
        return int((self.folder / "pids" / f"{part}.pid").read_text())


def _read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest.fixture(scope="module")
def stack():
    if not all(shutil.which(b) for b in BINARIES):
        done = subprocess.run(["bash", str(STACK), "install"], capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"scripts/stack.sh install failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    folder = Path(tempfile.mkdtemp(prefix="moerge-stack-"))     # under /tmp: postgres and nginx's worker reach it
    env = {**os.environ, "MOERGE_BUNDLED_POOL": "false", "MOERGE_POOL_POLL_S": str(POLL_S)}
    t0 = time.monotonic()
    try:    # a start that times out has started some parts: the stop below ends them
        started = subprocess.run(["bash", str(STACK), "start", str(folder)], env=env, capture_output=True, text=True,
                                 timeout=1500)
        if started.returncode != 0:
            pytest.fail(f"scripts/stack.sh start failed ({started.returncode}):\n{started.stderr[-3000:]}")
        print(f"\nstack started in {time.monotonic() - t0:.0f} s ({started.stderr.strip().splitlines()[-1]}):\n"
              f"{started.stdout}")
        yield Stack(folder, _read_env(folder / "stack.env"))
    finally:
        subprocess.run(["bash", str(STACK), "stop", str(folder)], capture_output=True, timeout=180)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, base_model_dir) -> Path:
    return make_lora(base_model_dir, tmp_path_factory.mktemp("stack-ad") / "pirate", base_name=BASE_ID, scale_b=0.02)


def register(url: str, folder: Path, name: str) -> httpx.Response:
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(folder.iterdir())]
    data = {"name": name, "description": PIRATE, "examples": json.dumps(["Say it like a pirate: hello my friend"])}
    return httpx.post(f"{url}/v1/experts", data=data, files=files, timeout=120)


def route(url: str, model: str, prompt: str = PIRATE_PROMPT) -> dict:
    r = httpx.post(f"{url}/v1/route", json={"model": model, "messages": [{"role": "user", "content": prompt}]},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def chat(url: str, model: str, prompt: str = PIRATE_PROMPT, max_tokens: int = 2) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=180, json={
        "model": model, "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": prompt}]})


def until(check, within_s: float, every_s: float = 0.05):
    """Call check() until it returns something true or within_s passed; the last result."""
    deadline = time.monotonic() + within_s
    while True:
        result = check()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(every_s)


def test_prometheus_reports_every_part_of_the_stack_up(stack):
    env = stack.env
    expected = {("moerge", env["REPLICA_A_URL"]), ("moerge", env["REPLICA_B_URL"]),
                *([("vllm", env["VLLM_URL"])] if env["VLLM_URL"] else []),     # STACK_VLLM=0: none
                ("nginx", env["NGINX_EXPORTER_URL"].removesuffix("/metrics")),
                ("postgres", env["POSTGRES_EXPORTER_URL"].removesuffix("/metrics")),
                ("prometheus", env["PROMETHEUS_URL"])}
    expected = {(job, url.removeprefix("http://")) for job, url in expected}

    def targets() -> dict:
        r = httpx.get(f"{stack.prometheus}/api/v1/query", params={"query": "up"}, timeout=10)
        return {(s["metric"]["job"], s["metric"]["instance"]): s["value"][1] for s in r.json()["data"]["result"]}

    seen = until(lambda: (t := targets()) and t.keys() == expected and all(v == "1" for v in t.values()) and t,
                 within_s=60, every_s=1) or targets()
    assert seen == {t: "1" for t in expected}


def test_dashboard_queries_use_only_metrics_the_stack_exports(stack):
    """Every metric a panel of the Grafana dashboard reads is one a target of this stack describes
    (Prometheus's target metadata: HELP and TYPE of every family, whether it has samples yet or not)."""
    from tests.stack.test_compose import dashboard_metrics, family

    r = httpx.get(f"{stack.prometheus}/api/v1/targets/metadata", timeout=10)
    exported = {family(m["metric"]) for m in r.json()["data"]}
    assert {"moerge_requests_total", "vllm:num_requests_waiting", "nginx_up", "pg_up"} <= {
        m["metric"] for m in r.json()["data"]}, "the metadata of every kind of target is there"
    used = dashboard_metrics(json.loads(DASHBOARD.read_text())) - {"up"}     # up: Prometheus's own, per scrape
    assert used and not {m for m in used if family(m) not in exported}


def test_registration_on_one_replica_is_routed_by_the_other_in_time_and_removal_reaches_both(stack, adapter):
    r = register(stack.lb, adapter, "stack-pirate")
    assert r.status_code == 201, r.text
    registered = time.monotonic()
    a = stack.replica_at(r.headers["x-moerge-upstream"])
    b = "b" if a == "a" else "a"
    on_b = stack.replicas[b]
    # routed by B's routers within the poll period + margin (pinned reads the registry: at once)
    seen = until(lambda: route(on_b, "moerge:embed")["chosen"] == ["stack-pirate"],
                 within_s=STATED_S - (time.monotonic() - registered))
    assert seen, f"replica {b} did not route to an expert registered on {a} within {STATED_S} s"
    assert route(on_b, "auto")["chosen"] == ["stack-pirate"]
    for model in ("stack-pirate", "auto"):
        answer = chat(on_b, model)
        assert answer.status_code == 200, answer.text
        assert answer.json()["moerge"]["chosen"] == ["stack-pirate"]
        # the adapter ran on the stack's engine (the vLLM server, with the servers executor)
        assert answer.headers["x-moerge-engine"] == stack.env["STACK_EXECUTOR"], answer.headers

    gone = httpx.delete(f"{stack.replicas[a]}/v1/experts/stack-pirate", timeout=60)
    assert gone.status_code == 200, gone.text
    removed = time.monotonic()
    for url in stack.replicas.values():
        assert chat(url, "stack-pirate").status_code == 404
        assert httpx.get(f"{url}/v1/experts/stack-pirate", timeout=10).status_code == 404
    dropped = until(lambda: "stack-pirate" not in route(on_b, "moerge:embed")["chosen"],
                    within_s=STATED_S - (time.monotonic() - removed))
    assert dropped, f"replica {b} still routes to an expert removed on {a} after {STATED_S} s"
    assert "stack-pirate" not in route(on_b, "auto")["chosen"]
    for url in stack.replicas.values():
        assert "stack-pirate" not in [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]


def test_two_replicas_registering_one_name_at_once_leave_one_winner_and_one_pool(stack, adapter):
    urls = list(stack.replicas.values())
    for round_ in range(3):
        name = f"contested-{round_}"
        gate = threading.Barrier(2)

        def attempt(url: str) -> httpx.Response:
            gate.wait()
            return register(url, adapter, name)

        with ThreadPoolExecutor(2) as ex:
            answers = list(ex.map(attempt, urls))
        assert sorted(r.status_code for r in answers) == [201, 409], [r.text for r in answers]
        loser = next(r for r in answers if r.status_code == 409)
        assert "NameTaken" in loser.text or "already" in loser.text, loser.text
        winner = next(r for r in answers if r.status_code == 201).json()
        cards = [httpx.get(f"{url}/v1/experts/{name}", timeout=10) for url in urls]
        assert [c.status_code for c in cards] == [200, 200]
        assert cards[0].json() == cards[1].json() == winner
        assert chat(urls[0], name).status_code == 200 and chat(urls[1], name).status_code == 200
    listed = [sorted(c["name"] for c in httpx.get(f"{url}/v1/experts", timeout=10).json()["data"]) for url in urls]
    assert listed[0] == listed[1] == [f"contested-{i}" for i in range(3)]
    for i in range(3):
        assert httpx.delete(f"{urls[i % 2]}/v1/experts/contested-{i}", timeout=60).status_code == 200
    assert [httpx.get(f"{url}/v1/experts", timeout=10).json()["data"] for url in urls] == [[], []]


class Traffic:
    """Threads that send chat requests through the balancer back to back, streamed and not; each request's
    start, end, outcome and (when the answer started) the replica that served it."""

    def __init__(self, stack: Stack, threads: int = 4):
        self.stack = stack
        self.records: list[dict] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _one(self, i: int, n: int) -> dict:
        stream = (i + n) % 2 == 0
        rec = {"stream": stream, "start": time.monotonic(), "replica": None, "open": True}
        with self.lock:
            self.records.append(rec)
        body = {"model": "base", "max_tokens": 48 if stream else 8, "ignore_eos": True, "stream": stream,
                "messages": [{"role": "user", "content": f"Tell me about ships, part {i}-{n}"}]}
        try:
            timeout = httpx.Timeout(10, read=60)     # a read timeout here is a hang
            with httpx.stream("POST", f"{self.stack.lb}/v1/chat/completions", json=body, timeout=timeout) as r:
                rec["replica"] = self.stack.replica_at(r.headers.get("x-moerge-upstream", ""))
                rec["status"] = r.status_code
                text = "".join(r.iter_text())
            rec["ok"] = r.status_code == 200 and (not stream or text.rstrip().endswith("data: [DONE]"))
            rec["error"] = None if rec["ok"] else f"{r.status_code}: {text[-200:]}"
        except httpx.TimeoutException as e:
            rec["ok"], rec["error"], rec["hang"] = False, f"timeout: {e!r}", True
        except httpx.HTTPError as e:
            rec["ok"], rec["error"] = False, repr(e)
        rec["end"] = time.monotonic()
        rec["open"] = False
        return rec

    def _run(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            self._one(i, n)
            n += 1

    def streaming_on(self, replica: str) -> list[dict]:
        """Streams `replica` has begun to answer (its response header arrived) that are still open."""
        with self.lock:
            return [r for r in self.records if r["open"] and r["stream"] and r["replica"] == replica]

    def done(self) -> list[dict]:
        with self.lock:
            return [r for r in self.records if not r["open"]]


def test_a_replica_killed_mid_traffic_fails_only_its_requests_in_flight(stack):
    traffic = Traffic(stack)
    for t in traffic.threads:
        t.start()
    try:
        # kill replica a while a stream is open on it and some requests have finished
        assert until(lambda: len(traffic.done()) >= 4 and traffic.streaming_on("a"), within_s=180, every_s=0.01), \
            "no stream was open on replica a within 180 s"
        with traffic.lock:
            open_at_kill = [r for r in traffic.records if r["open"]]
        os.killpg(stack.pgid("replica-a"), signal.SIGKILL)
        killed = time.monotonic()
        assert until(lambda: len([r for r in traffic.done() if r["start"] > killed]) >= 8, within_s=240, every_s=0.2), \
            "fewer than 8 requests after the kill ended within 240 s"
    finally:
        traffic.stop.set()
        for t in traffic.threads:
            t.join(timeout=120)
    records = traffic.done()
    assert len(records) == len(traffic.records), "every request ended (none hangs)"
    hangs = [r for r in records if r.get("hang")]
    assert not hangs, hangs
    failed = [r for r in records if not r["ok"]]
    streaming_on_a = [r for r in open_at_kill if r["replica"] == "a" and r["stream"]]
    assert any(not r["ok"] for r in streaming_on_a), \
        "a stream the killed replica had begun to answer got an error (a begun answer is never resent)"
    # every failure was a request that replica a had begun to answer before the kill: one it had received
    # but not answered is resent to b (chat completions are resent, deploy/nginx/moerge.conf.template)
    assert all(r["start"] < killed and r["replica"] in ("a", None) for r in failed), failed
    after = [r for r in records if r["start"] > killed]
    assert after and all(r["ok"] and r["replica"] == "b" for r in after), [r for r in after if not r["ok"]]
    print(f"\n{len(records)} requests: {len(failed)} failed, all begun on the killed replica; {len(after)} after the kill, all served by b")
    if stack.env["STACK_EXECUTOR"] == "servers":      # and the answers came from the vLLM server
        served = sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$",
                                                  httpx.get(stack.env["VLLM_URL"] + "/metrics").text, re.M))
        assert served >= len(records) - len(failed)


def _live_pids_in_groups(groups: set[int]) -> list[str]:
    """Processes (not zombies) whose process group is one of `groups`, from /proc."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgid = fields[0], int(fields[2])
        if pgid in groups and state != "Z":
            live.append(stat.parent.name)
    return live


def test_stop_ends_every_process_the_stack_started(stack):
    groups = {int(p.read_text()) for p in (stack.folder / "pids").glob("*.pid")}
    postmaster = int((stack.folder / "pg" / "data" / "postmaster.pid").read_text().split()[0])
    groups.add(int(re.split(r"\s+", Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].strip())[2]))
    assert len(groups) >= 7 and _live_pids_in_groups(groups)
    done = subprocess.run(["bash", str(STACK), "stop", str(stack.folder)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    left = until(lambda: not _live_pids_in_groups(groups), within_s=10, every_s=0.2)
    assert left, f"still running after stop: {_live_pids_in_groups(groups)}"
