"""One replica for tests/experts/test_replicas.py: a separate process that opens an ExpertPool and obeys
JSON commands, one a line on stdin, with one JSON reply a line. Change events its listener hears are kept
with the wall-clock time they arrived, so the test can tell how long another replica's change took.

Run as `python tests/experts/replica_worker.py`; it answers {"ready": true} once the heavy imports are done.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback


class Replica:
    def __init__(self, embed):
        self.embed = embed
        self.pool = None
        self.held = contextlib.ExitStack()
        self.events: list[list] = []
        self._events_lock = threading.Lock()

    def listener(self, event: str, name: str) -> None:
        with self._events_lock:
            self.events.append([event, name, time.time()])

    def open(self, root: str, url: str, base: str, poll_s: float, busy_timeout_s: float = 5.0) -> dict:
        from moerge.experts.lora import base_spec_from_folder
        from moerge.experts.pool import ExpertPool
        spec = base_spec_from_folder(base, "tiny/llama")
        self.pool = ExpertPool(root, url, spec, embed=self.embed, poll_s=poll_s, busy_timeout_s=busy_timeout_s)
        self.events.clear()
        self.pool.on_change(self.listener)
        return {"ok": True}

    def register(self, folder: str, name: str, description: str, at: float | None = None) -> dict:
        """Register (at wall-clock time `at`, if given); the typed error as data if it is refused."""
        from moerge.experts.errors import ExpertError
        if at is not None:
            time.sleep(max(0.0, at - time.time()))
        t0 = time.time()
        try:
            self.pool.register_lora(folder, name, description)
        except ExpertError as e:
            return {"ok": False, "error": type(e).__name__, "status": e.status, "message": e.message,
                    "started": t0, "t": time.time()}
        return {"ok": True, "started": t0, "t": time.time()}

    def remove(self, name: str) -> dict:
        self.pool.remove(name)
        return {"ok": True, "t": time.time()}

    def get_events(self) -> dict:
        with self._events_lock:
            return {"ok": True, "events": list(self.events)}

    def hold(self) -> dict:
        self.held.enter_context(self.pool.locked())
        return {"ok": True}

    def release(self) -> dict:
        self.held.close()
        return {"ok": True}

    def close(self) -> dict:
        self.held.close()
        if self.pool is not None:
            self.pool.close()
        self.pool = None
        return {"ok": True}


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever a library prints goes to stderr, not into the replies

    from moerge.models.embedder import get_embedder
    embedder = get_embedder()
    embedder.encode(["warm up"])
    replica = Replica(embedder.encode)
    ops = {"open": replica.open, "register": replica.register, "remove": replica.remove,
           "events": replica.get_events, "hold": replica.hold, "release": replica.release, "close": replica.close}
    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "quit":
            break
        try:
            reply = ops[op](**cmd)
        except Exception as e:
            reply = {"ok": False, "error": type(e).__name__, "message": str(e),
                     "traceback": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
    replica.close()


if __name__ == "__main__":
    main()
