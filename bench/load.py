"""A locust load run on loopback: concurrent users send mixed plans to the service while one user
registers and removes an expert over the HTTP API, over and over.

python -m bench.load [--users 32] [--duration 120] [--spawn-rate 8] [--tokens 12] [--port 8766] [--docs-copy]

Needs the `load` extra (`pip install -c constraints.txt -e '.[load]'`). A child process starts the
service as `moerge serve` would (vLLM engine, default settings, the bundled library in a temporary
pool) under uvicorn on 127.0.0.1; this process runs locust as a library (headless, one local
runner). Chat users pick, in equal shares: the base model (`base`), a pinned adapter
(`arith_add`, `uppercase`, `capital_of`), token-level routing (`moerge:arrow`, `moerge:phatgoose`);
greedy, `--tokens` new tokens each. One more user (the churner) uploads an adapter as `churn`
(POST /v1/experts, multipart) and deletes it (DELETE /v1/experts/churn), without pause.

Recorded: requests/s over the run, p50/p99 per request kind, errors (any status but 200/201, a
body without an answer, a chat answer on an engine other than vLLM), and the resident memory (RSS)
of the service process and of the vLLM engine processes (its descendants), sampled every second:
start (after warm-up), end, max, growth, the least-squares slope over the second half of the run; and
where each process grew, by kind of memory mapping (smaps: heap, anonymous, files). JSON in runs/bench/load.json, a plot in
runs/bench/load.png (with --docs-copy, both also in docs/results/load/, apart from the evaluation report). The child's process group (EngineCore included) is ended at the end.
Exit status 1 when any request failed.
"""

from __future__ import annotations

# locust patches the standard library for gevent when it is imported: before anything else
from locust import HttpUser, constant, events, task  # noqa: I001
from locust.env import Environment

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gevent
import psutil

from moerge.executors.memory import smaps

CHAT_KINDS = {"base": ["base"], "adapter": ["arith_add", "uppercase", "capital_of"],
              "token-arrow": ["moerge:arrow"], "token-phatgoose": ["moerge:phatgoose"]}
PROMPTS = ["What is 345 + 210? Answer with the number only.", "Convert to upper case: the cat sat on the mat",
           "What is the capital of Peru?", "Reverse the order of the words: red green blue",
           "Write a short sentence about the sea."]
CHURN_FROM = Path(__file__).resolve().parent.parent / "moerge" / "experts" / "library" / "sentiment"

CHILD = """
import sys
from pathlib import Path
import uvicorn
from moerge.config import Settings
from moerge.service.app import create_app
from moerge.service.runtime import Runtime
from moerge.startup import start
if __name__ == "__main__":
    port, pool_dir = int(sys.argv[1]), Path(sys.argv[2])
    system = start(Settings(bundled_pool=True), pool_dir=pool_dir,
                   progress=lambda m: print(m, flush=True))
    try:
        uvicorn.run(create_app(Runtime(system)), host="127.0.0.1", port=port, log_level="warning")
    finally:
        system.shutdown()
"""


class Record:
    """Every request's end time, kind, latency and outcome (exact percentiles, not locust's buckets)."""

    def __init__(self):
        self.rows: list[tuple[float, str, float, bool]] = []
        self.errors: list[str] = []
        self.engines: dict[str, dict[str, int]] = {}

    def on_request(self, request_type, name, response_time, response_length, exception=None, **kw):
        self.rows.append((time.monotonic(), name, float(response_time), exception is None))
        if exception is not None and len(self.errors) < 20:
            self.errors.append(f"{name}: {exception}")


def make_users(tokens: int):
    rec = Record()

    class ChatUser(HttpUser):
        wait_time = constant(0)
        weight = 1
        n = 0

        def _chat(self, kind: str):
            ChatUser.n += 1
            models = CHAT_KINDS[kind]
            body = {"model": models[ChatUser.n % len(models)], "max_tokens": tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": PROMPTS[ChatUser.n % len(PROMPTS)]}]}
            with self.client.post("/v1/chat/completions", json=body, name=kind, catch_response=True) as r:
                if r.status_code != 200:
                    r.failure(f"status {r.status_code}: {r.text[:200]}")
                    return
                engine = r.headers.get("x-moerge-engine", "?")
                counts = rec.engines.setdefault(kind, {})
                counts[engine] = counts.get(engine, 0) + 1
                try:
                    answer = r.json()["choices"][0]["message"]["content"]
                except (ValueError, KeyError, IndexError):
                    r.failure(f"no answer in the body: {r.text[:200]}")
                    return
                if engine != "vllm":
                    r.failure(f"answered by engine {engine!r}, not vllm")
                elif not isinstance(answer, str):
                    r.failure("the answer is not text")

        @task
        def base(self):
            self._chat("base")

        @task
        def adapter(self):
            self._chat("adapter")

        @task
        def token_arrow(self):
            self._chat("token-arrow")

        @task
        def token_phatgoose(self):
            self._chat("token-phatgoose")

    files = {f: (CHURN_FROM / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}

    class ChurnUser(HttpUser):
        wait_time = constant(0)
        fixed_count = 1

        @task
        def churn(self):
            upload = [("files", (f, data, "application/json" if f.endswith(".json") else "application/octet-stream"))
                      for f, data in files.items()]
            with self.client.post("/v1/experts", data={"name": "churn", "description": "registered and removed "
                                  "under load"}, files=upload, name="register", catch_response=True) as r:
                if r.status_code != 201:
                    r.failure(f"status {r.status_code}: {r.text[:200]}")
                    return
            with self.client.delete("/v1/experts/churn", name="remove", catch_response=True) as r:
                if r.status_code != 200:
                    r.failure(f"status {r.status_code}: {r.text[:200]}")

    return ChatUser, ChurnUser, rec


def _rss_mib(pid: int) -> tuple[float, float]:
    """(service process RSS, its descendants' RSS summed: the vLLM engine processes), MiB."""
    try:
        p = psutil.Process(pid)
        own = p.memory_info().rss
        kids = 0
        for c in p.children(recursive=True):
            try:
                kids += c.memory_info().rss
            except psutil.Error:
                pass
        return own / 2**20, kids / 2**20
    except psutil.Error:
        return float("nan"), float("nan")


def _maps_by_process(pid: int) -> dict[str, dict]:
    """smaps of the service process and of each of its descendants, by 'service' / 'engine:<name>'."""
    procs = {"service": pid}
    try:
        for c in psutil.Process(pid).children(recursive=True):
            try:
                procs[f"engine:{c.name()}:{c.pid}"] = c.pid
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return {who: smaps(p) for who, p in procs.items()}


def _map_kind(path: str, size_mib: float) -> str:
    if path == "[heap]":
        return "brk heap"
    if path.startswith("/"):
        return "file"
    if path.startswith("["):
        return path                      # [stack], [vdso], ...
    # glibc's per-thread arenas reserve 64 MiB regions; bigger anonymous maps are single large allocations
    return "anon <=64M" if size_mib <= 64.5 else "anon large"


def _maps_growth(before: dict[str, dict], after: dict[str, dict]) -> dict:
    """Where each process's resident memory grew between the two snapshots: by mapping kind, and the top
    mappings. A mapping that is new counts in full, one that is gone counts negative."""
    result = {}
    for who in after:
        a, b = before.get(who, {}), after[who]
        rows = []
        for key in set(a) | set(b):
            size, rss1 = b.get(key, (a.get(key, (0.0, 0.0))[0], 0.0))
            rss0 = a.get(key, (0.0, 0.0))[1]
            if rss1 != rss0:
                rows.append({"growth_mib": round(rss1 - rss0, 1), "size_mib": round(size, 1),
                             "kind": _map_kind(key[1], size), "path": key[1] or "(anonymous)"})
        by_kind: dict[str, float] = {}
        for r in rows:
            by_kind[r["kind"]] = round(by_kind.get(r["kind"], 0.0) + r["growth_mib"], 1)
        rows.sort(key=lambda r: -abs(r["growth_mib"]))
        result[who] = {"by_kind": by_kind, "top": rows[:15],
                       "new_anon_mappings": sum(1 for k in set(b) - set(a) if not k[1])}
    return result


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[i]


def _slope_mib_per_min(ts: list[float], vals: list[float]) -> float:
    """Least-squares slope, MiB per minute (the readings wobble as heaps are trimmed)."""
    n = len(ts)
    if n < 2:
        return float("nan")
    mt, mv = sum(ts) / n, sum(vals) / n
    var = sum((t - mt) ** 2 for t in ts)
    return 60 * sum((t - mt) * (v - mv) for t, v in zip(ts, vals)) / var if var else float("nan")


def _memory(samples: list[tuple[float, float, float]], col: int) -> dict:
    vals = [s[col] for s in samples]
    half = [s for s in samples if s[0] >= (samples[0][0] + samples[-1][0]) / 2]
    return {"start_mib": round(vals[0], 1), "end_mib": round(vals[-1], 1), "max_mib": round(max(vals), 1),
            "growth_mib": round(vals[-1] - vals[0], 1),
            "second_half_slope_mib_per_min": round(_slope_mib_per_min([s[0] for s in half], [s[col] for s in half]), 1)}


def _plot(result: dict, samples, rec: Record, t0: float, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    window = 5.0
    end = max((r[0] for r in rec.rows), default=t0) - t0
    starts = [i * window for i in range(int(end // window))]          # whole windows only
    series = {kind: [r[0] - t0 for r in rec.rows if r[1] == kind and r[3]] for kind in [*CHAT_KINDS, "register"]}
    series["chat (all)"] = [r[0] - t0 for r in rec.rows if r[1] in CHAT_KINDS and r[3]]
    for kind, ts in series.items():
        rates = [sum(1 for t in ts if a <= t < a + window) / window for a in starts]
        ax1.plot([a + window / 2 for a in starts], rates, label=kind if kind != "register" else "register+remove",
                 linewidth=2.5 if kind == "chat (all)" else 1.2)
    ax1.set_ylabel(f"requests/s ({window:.0f} s windows)")
    ax1.legend(fontsize=7, ncol=3)
    ax1.set_title(f"locust on loopback: {result['users']} chat users + 1 churner, {result['tokens']} tokens, "
                  f"errors {result['errors']}", fontsize=9)
    ts = [s[0] - t0 for s in samples]
    ax2.plot(ts, [s[1] for s in samples], label="service process")
    ax2.plot(ts, [s[2] for s in samples], label="vLLM engine processes")
    ax2.set_ylabel("RSS (MiB)")
    ax2.set_xlabel("seconds into the run")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _end_group(child: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM the service's process group, wait until every member (the EngineCore outlives the service
    process by a few seconds) is gone, SIGKILL what is left after `grace_s`."""
    try:
        os.killpg(child.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        child.poll()
        try:
            os.killpg(child.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait(10)


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=32, help="concurrent chat users (the churner is one more)")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load after the users spawned")
    ap.add_argument("--spawn-rate", type=float, default=8.0, help="users started per second")
    ap.add_argument("--tokens", type=int, default=12, help="new tokens per chat request")
    ap.add_argument("--churners", type=int, default=1, choices=(0, 1),
                    help="1: one user registers and removes an expert without pause; 0: none (chat load only)")
    ap.add_argument("--port", type=int, default=8766)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/load.json"))
    ap.add_argument("--docs-copy", action="store_true", help="also copy the JSON and the plot to docs/results/load/")
    args = ap.parse_args(argv)
    url = f"http://127.0.0.1:{args.port}"
    pool_dir = Path(tempfile.mkdtemp(prefix="moerge-load-"))      # the service's pool, removed at the end
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(args.port), str(pool_dir)], start_new_session=True,
                             stdout=subprocess.DEVNULL if os.environ.get("MOERGE_LOAD_QUIET") else None)
    try:
        import requests
        deadline = time.monotonic() + 900
        while True:
            if child.poll() is not None:
                raise RuntimeError(f"the service process ended (status {child.returncode}) before it was ready")
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the service was not ready within 900 s")
            time.sleep(1)
        # warm-up: one request of each kind (experts loaded, routers fitted) before memory is measured
        for kind, models in CHAT_KINDS.items():
            for m in models:
                r = requests.post(f"{url}/v1/chat/completions", timeout=600, json={
                    "model": m, "max_tokens": args.tokens, "messages": [{"role": "user", "content": PROMPTS[0]}]})
                if r.status_code != 200:
                    raise RuntimeError(f"warm-up {m}: {r.status_code} {r.text[:300]}")

        ChatUser, ChurnUser, rec = make_users(args.tokens)
        ChatUser.host = ChurnUser.host = url
        env = Environment(user_classes=[ChatUser, ChurnUser] if args.churners else [ChatUser], events=events)
        env.events.request.add_listener(rec.on_request)
        runner = env.create_local_runner()
        samples: list[tuple[float, float, float]] = []
        stop = False

        def sample():
            while not stop:
                samples.append((time.monotonic(), *_rss_mib(child.pid)))
                gevent.sleep(1.0)

        sampler = gevent.spawn(sample)
        t0 = time.monotonic()
        maps0 = _maps_by_process(child.pid)
        runner.start(args.users + args.churners, spawn_rate=args.spawn_rate)
        spawn_s = (args.users + args.churners) / args.spawn_rate
        gevent.spawn_later(spawn_s + args.duration, runner.quit)
        runner.greenlet.join()
        t_end = time.monotonic()
        stop = True
        sampler.join(5)
        samples.append((time.monotonic(), *_rss_mib(child.pid)))
        maps1 = _maps_by_process(child.pid)
    finally:
        _end_group(child)
        shutil.rmtree(pool_dir, ignore_errors=True)

    # figures over the steady part: after every user spawned
    steady0 = t0 + spawn_s
    kinds = {}
    for kind in [*CHAT_KINDS, "register", "remove"]:
        rows = [r for r in rec.rows if r[1] == kind]
        ok = [r[2] for r in rows if r[3]]
        steady = [r for r in rows if r[0] >= steady0]
        kinds[kind] = {"requests": len(rows), "failures": len(rows) - len(ok),
                       "requests_per_s": round(len(steady) / max(1e-9, t_end - steady0), 2),
                       "p50_ms": round(_percentile(ok, 0.50), 1), "p99_ms": round(_percentile(ok, 0.99), 1)}
    chat = [r for r in rec.rows if r[1] in CHAT_KINDS]
    chat_steady = [r for r in chat if r[0] >= steady0]
    result = {
        "users": args.users, "churners": args.churners, "duration_s": args.duration, "spawn_rate": args.spawn_rate,
        "tokens": args.tokens, "cpu_count": os.cpu_count(), "run_s": round(t_end - t0, 1),
        "chat_requests_per_s": round(len(chat_steady) / max(1e-9, t_end - steady0), 2),
        "chat_p50_ms": round(_percentile([r[2] for r in chat if r[3]], 0.50), 1),
        "chat_p99_ms": round(_percentile([r[2] for r in chat if r[3]], 0.99), 1),
        "errors": sum(1 for r in rec.rows if not r[3]), "error_samples": rec.errors,
        "churn_cycles": sum(1 for r in rec.rows if r[1] == "remove" and r[3]),
        "engines": rec.engines, "kinds": kinds,
        "memory": {"samples": len(samples), "service": _memory(samples, 1), "engine": _memory(samples, 2)},
        "memory_by_mapping": _maps_growth(maps0, maps1),
        "memory_trace": [[round(s[0] - t0, 1), round(s[1], 1), round(s[2], 1)] for s in samples],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    _plot(result, samples, rec, t0, args.out.with_suffix(".png"))
    print(f"{args.users} users + {args.churners} churner(s), {result['run_s']} s: chat {result['chat_requests_per_s']} req/s, "
          f"p50 {result['chat_p50_ms']} ms, p99 {result['chat_p99_ms']} ms, errors {result['errors']}, "
          f"{result['churn_cycles']} register/remove cycles")
    for kind, k in kinds.items():
        print(f"  {kind:16} {k['requests']:6} requests {k['failures']:4} failed  {k['requests_per_s']:6} req/s  "
              f"p50 {k['p50_ms']:8} ms  p99 {k['p99_ms']:8} ms")
    m = result["memory"]
    for part in ("service", "engine"):
        print(f"  RSS {part:8} start {m[part]['start_mib']} MiB, end {m[part]['end_mib']} MiB, "
              f"max {m[part]['max_mib']} MiB, growth {m[part]['growth_mib']} MiB, "
              f"second-half slope {m[part]['second_half_slope_mib_per_min']} MiB/min")
    for who, g in result["memory_by_mapping"].items():
        print(f"  RSS growth of {who} by mapping kind (MiB): " + ", ".join(f"{k} {v:+.1f}" for k, v in g["by_kind"].items()))
        for row in g["top"][:5]:
            print(f"    {row['growth_mib']:+8.1f} MiB  {row['kind']:10} {row['size_mib']:8.1f} MiB mapping  {row['path']}")
    for e in rec.errors[:5]:
        print("  error:", e)
    print(f"JSON in {args.out}, plot in {args.out.with_suffix('.png')}")
    if args.docs_copy:
        docs = Path(__file__).resolve().parent.parent / "docs" / "results" / "load"
        docs.mkdir(parents=True, exist_ok=True)
        for f in (args.out, args.out.with_suffix(".png")):
            shutil.copy(f, docs / f.name)
        print(f"copied to {docs}")
    return result


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:])["errors"] else 0)
