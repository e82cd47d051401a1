"""Several replicas on one pool: each is a separate process with its own ExpertPool on one registry
(PostgreSQL, or SQLite on a shared folder). Another replica's registration or removal reaches a replica's
listeners within the poll period, once; two replicas registering one name at once leave one winner, a 409
for the other and a consistent pool; on PostgreSQL the advisory lock serialises replicas that share no
file lock, and waiting past the busy timeout for it is a 503.

The replicas run tests/experts/replica_worker.py. `MOERGE_REPLICA_ROUNDS=50` measures the visibility
delay over more rounds, `MOERGE_REPLICA_POLL_S=1` at another poll period (printed with -s)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moerge.experts.changes import changes_between
from moerge.experts.pool import ExpertPool
from moerge.experts.registry import Registry
from moerge.experts.store import ArtifactStore
from tests.helpers import make_lora

WORKER = Path(__file__).with_name("replica_worker.py")
POLL_S = float(os.environ.get("MOERGE_REPLICA_POLL_S", "0.25"))
STATED_S = POLL_S + 0.75      # what docs/deployment.md promises: the poll period, plus one look and the listeners
ROUNDS = int(os.environ.get("MOERGE_REPLICA_ROUNDS", "4"))
# Without a lock the pool goes wrong only in some races: when the loser published a shared blob first but
# inserted second, its clean-up deletes a blob the winner's card needs. With the advisory lock removed,
# 16 rounds caught that in 4 of 6 runs; the lock test below fails every time.
CONTESTED_ROUNDS = int(os.environ.get("MOERGE_CONTESTED_ROUNDS", "16"))


class ReplicaProcess:
    """The test's end of one replica_worker process."""

    def __init__(self, label: str):
        self.label = label
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=Path(__file__).resolve().parents[2])

    def send(self, op: str, **kwargs) -> None:
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = 60.0) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"replica {self.label} gave no answer within {timeout:g} s "
                                 f"(exit status {self.proc.poll()})")
        answer = json.loads(line)
        if "traceback" in answer:
            raise AssertionError(f"replica {self.label} failed:\n{answer['traceback']}")
        return answer

    def call(self, op: str, **kwargs) -> dict:
        self.send(op, **kwargs)
        return self.reply()

    def events(self) -> list[list]:
        return self.call("events")["events"]

    def wait_for(self, event: str, name: str, timeout: float) -> float | None:
        """The wall-clock time this replica's listener heard (event, name), or None if not within timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev, nm, at in self.events():
                if (ev, nm) == (event, name):
                    return at
            time.sleep(0.02)
        return None

    def quit(self) -> None:
        try:
            self.send("quit")
            self.proc.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def replicas():
    """Two replica processes, A and B, started together (each loads the embedder once)."""
    pair = ReplicaProcess("A"), ReplicaProcess("B")
    try:
        for r in pair:
            assert r.reply(timeout=180) == {"ready": True}
        yield pair
    finally:
        for r in pair:
            r.quit()


@pytest.fixture
def adapters(tmp_path, tiny_base) -> list[Path]:
    return [make_lora(tiny_base, tmp_path / f"adapter-{i}", base_name="tiny/llama", seed=10 + i) for i in range(2)]


def two_hosts(tmp_path: Path) -> tuple[Path, list[Path]]:
    """(the shared store, two pool folders): each folder has its own lock file, and its blobs, staging and
    adapters are the shared store's, as on two hosts that mount one store but share no file lock."""
    shared = tmp_path / "shared"
    for part in ("blobs", "staging", "adapters"):
        (shared / part).mkdir(parents=True)
    roots = []
    for host in ("host-a", "host-b"):
        root = tmp_path / host
        root.mkdir()
        for part in ("blobs", "staging", "adapters"):
            (root / part).symlink_to(shared / part, target_is_directory=True)
        roots.append(root)
    return shared, roots


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_changes_between_two_views_name_a_re_registration_as_removed_then_added():
    old = {"kept": (1.0, "k"), "gone": (1.0, "g"), "edited": (1.0, "e"), "replaced": (1.0, "r")}
    new = {"kept": (1.0, "k"), "edited": (1.0, "e2"), "replaced": (2.0, "r2"), "new": (3.0, "n")}
    assert changes_between(old, new) == [("removed", "gone"), ("updated", "edited"), ("added", "new"),
                                         ("removed", "replaced"), ("added", "replaced")]
    assert changes_between(new, new) == []


def test_a_pool_hears_another_pools_changes_once_and_its_own_never_twice(tmp_path, tiny_spec, embedder, tiny_base):
    root = tmp_path / "pool"
    url = f"sqlite:///{root}/registry.sqlite"
    a = ExpertPool(root, url, tiny_spec, embed=embedder.encode, poll_s=0)
    b = ExpertPool(root, url, tiny_spec, embed=embedder.encode, poll_s=0)
    heard_a, heard_b = [], []
    a.on_change(lambda event, name: heard_a.append((event, name)))
    b.on_change(lambda event, name: heard_b.append((event, name)))
    adapter = make_lora(tiny_base, tmp_path / "adapter", base_name="tiny/llama", seed=1)
    try:
        a.register_lora(adapter, "x", "first")
        b.changes.poll()
        assert heard_b == [("added", "x")]
        a.update("x", description="second")
        b.changes.poll()
        assert heard_b[1:] == [("updated", "x")]
        a.remove("x")
        a.register_lora(adapter, "x", "third")     # between two polls: B's view still holds the old x
        b.changes.poll()
        assert heard_b[2:] == [("removed", "x"), ("added", "x")]
        b.remove("x")
        a.changes.poll()
        b.changes.poll()
        assert heard_b[4:] == [("removed", "x")]
        assert heard_a == [("added", "x"), ("updated", "x"), ("removed", "x"), ("added", "x"), ("removed", "x")]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_registration_and_a_removal_on_one_replica_reach_the_other_within_the_poll_period(
        backend, request, tmp_path, replicas, tiny_base, adapters):
    root = tmp_path / "pool"
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else f"sqlite:///{root}/registry.sqlite"
    a, b = replicas
    for r in replicas:
        assert r.call("open", root=str(root), url=url, base=str(tiny_base), poll_s=POLL_S)["ok"]
    try:
        delays = []
        for i in range(ROUNDS):
            name = f"expert-{i}"
            time.sleep(random.uniform(0, POLL_S))   # not in step with B's poll, so the delays are a fair sample
            done = a.call("register", folder=str(adapters[i % 2]), name=name, description=f"expert number {i}")
            assert done["ok"], done
            heard = b.wait_for("added", name, timeout=STATED_S + 10)
            assert heard is not None, f"replica B never heard that A registered {name}"
            delays.append(heard - done["t"])
            time.sleep(random.uniform(0, POLL_S))
            done = a.call("remove", name=name)
            heard = b.wait_for("removed", name, timeout=STATED_S + 10)
            assert heard is not None, f"replica B never heard that A removed {name}"
            delays.append(heard - done["t"])
        time.sleep(4 * POLL_S)    # time for a late duplicate from either replica's poll to arrive, if any would
        expected = [[event, f"expert-{i}"] for i in range(ROUNDS) for event in ("added", "removed")]
        assert [e[:2] for e in b.events()] == expected
        assert [e[:2] for e in a.events()] == expected   # A's own changes once, not again from its poll
        p50, p99 = np.percentile(delays, [50, 99])
        print(f"\n{backend}: visibility delay over {len(delays)} changes, poll {POLL_S} s: "
              f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms")
        assert max(delays) <= STATED_S, delays
    finally:
        for r in replicas:
            r.call("close")


def test_two_replicas_registering_one_name_at_once_leave_one_winner_a_409_and_a_consistent_pool(
        pg_url, tmp_path, replicas, tiny_base, adapters):
    shared, roots = two_hosts(tmp_path)
    a, b = replicas
    for r, root in zip(replicas, roots):
        assert r.call("open", root=str(root), url=pg_url, base=str(tiny_base), poll_s=POLL_S)["ok"]
    winners = {}
    try:
        for i in range(CONTESTED_ROUNDS):
            name = f"contested-{i}"
            # mostly the same adapter on both: the blobs are shared, and a loser that deleted one it thinks it
            # published would break the winner's card; every third round different ones: the loser's must go
            folders = (adapters[0], adapters[1]) if i % 3 == 2 else (adapters[0], adapters[0])
            at = time.time() + 0.2
            for r, folder in zip(replicas, folders):
                r.send("register", folder=str(folder), name=name, description=f"contested {i}", at=at)
            outcomes = [r.reply() for r in replicas]
            assert abs(outcomes[0]["started"] - outcomes[1]["started"]) < 0.1, outcomes  # a real race
            assert sorted(o["ok"] for o in outcomes) == [False, True], outcomes
            loser = next(o for o in outcomes if not o["ok"])
            assert (loser["error"], loser["status"]) == ("NameTakenError", 409), loser
            winners[name] = folders[[o["ok"] for o in outcomes].index(True)]
    finally:
        for r in replicas:
            r.call("close")
    registry = Registry(pg_url)
    try:
        cards = registry.list()
    finally:
        registry.close()
    assert [c.name for c in cards] == sorted(winners)
    store = ArtifactStore(shared)
    referenced = {d for c in cards for d in c.artifacts.values()}
    assert store.all_digests() == referenced          # no orphan blob, and none a card needs is missing
    assert list(store.staging.iterdir()) == []
    for card in cards:
        for digest in card.artifacts.values():
            assert hashlib.sha256(store.read(digest)).hexdigest() == digest
        assert card.artifacts["adapter_weights"] == sha256_file(winners[card.name] / "adapter_model.safetensors")


def test_a_replica_holding_the_pool_lock_makes_another_hosts_registration_wait_then_get_503(
        pg_url, tmp_path, replicas, tiny_base, adapters):
    shared, roots = two_hosts(tmp_path)        # no shared lock file: only PostgreSQL's advisory lock is common
    a, b = replicas
    for r, root in zip(replicas, roots):
        assert r.call("open", root=str(root), url=pg_url, base=str(tiny_base), poll_s=0, busy_timeout_s=1.0)["ok"]
    try:
        assert a.call("hold")["ok"]
        try:
            refused = b.call("register", folder=str(adapters[0]), name="waiting", description="waits for the lock")
        finally:
            assert a.call("release")["ok"]
        assert not refused["ok"], "B registered while A held the pool lock"
        assert (refused["error"], refused["status"]) == ("RegistryBusyError", 503), refused
        assert "busy" in refused["message"] and "over 1 s" in refused["message"]
        waited = refused["t"] - refused["started"]
        assert 1.0 <= waited < 3.0, waited              # the busy timeout: not at once, not forever
        store = ArtifactStore(shared)
        assert store.all_digests() == set() and list(store.staging.iterdir()) == []
        done = b.call("register", folder=str(adapters[0]), name="waiting", description="the lock is free")
        assert done["ok"], done
    finally:
        for r in replicas:
            r.call("close")
