"""The pool's change feed: tells this process's listeners about every registration, update and removal,
its own at once and those of other processes (replicas) sharing the registry within one poll period.

Another process's changes are found by polling the registry's pool version; when it moved, the stored rows
are compared with the ones this process last saw. Own writes update that view under the pool lock in the
same step as their commit, so the poll never reports them a second time.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable

from moerge.experts.registry import Fingerprint, Registry, fingerprint

log = logging.getLogger("moerge.experts.changes")

ChangeListener = Callable[[str, str], None]  # (event, name): "added" | "updated" | "removed"


def changes_between(old: dict[str, Fingerprint], new: dict[str, Fingerprint]) -> list[tuple[str, str]]:
    """The events that turn `old` into `new`; an expert registered again under its name (a new
    created_at) is "removed" then "added", a changed row with the same created_at is "updated"."""
    events = [("removed", name) for name in sorted(old.keys() - new.keys())]
    for name in sorted(new):
        before = old.get(name)
        if before is None:
            events.append(("added", name))
        elif before[0] != new[name][0]:
            events += [("removed", name), ("added", name)]
        elif before != new[name]:
            events.append(("updated", name))
    return events


class PoolChangeFeed:
    def __init__(self, registry: Registry, guard: threading.RLock, poll_s: float):
        """Read the registry's current state as the baseline. `guard` is the lock every pool write holds
        from before its commit until it calls `record`; the poll holds it while it compares."""
        self.registry = registry
        self.poll_s = poll_s
        self._guard = guard
        self._listeners: list[ChangeListener] = []
        self._pending: deque[tuple[str, str]] = deque()
        self._dispatching = threading.RLock()
        self._version = registry.version()
        self._seen = registry.fingerprints()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error = ""

    def subscribe(self, listener: ChangeListener) -> None:
        """Call `listener(event, name)` for every change from now on; the first listener starts the poll."""
        self._listeners.append(listener)
        if self._thread is None and self.poll_s > 0:
            self._thread = threading.Thread(target=_poll_loop, args=(weakref.ref(self), self._stop, self.poll_s),
                                            name="moerge-pool-poll", daemon=True)
            self._thread.start()

    def record(self, event: str, name: str, body: str | None) -> None:
        """This process committed `event` on `name` (`body`: the row it wrote, None once removed). Call
        under the guard, right after the commit; `dispatch` after the guard is released. Never raises."""
        if body is None:
            self._seen.pop(name, None)
        else:
            self._seen[name] = fingerprint(body)
        self._pending.append((event, name))

    def poll(self) -> None:
        """If the pool version moved, queue what other processes changed since the last look, and dispatch."""
        with self._guard:
            version = self.registry.version()   # before the rows: a write in between is found next time
            if version != self._version:
                rows = self.registry.fingerprints()
                self._pending.extend(changes_between(self._seen, rows))
                self._seen, self._version = rows, version
        self.dispatch()

    def dispatch(self) -> None:
        """Hand every queued event to every listener, in the order the events were queued. Returns once the
        events queued before the call have been handed over (by this thread or by another one)."""
        with self._dispatching:
            while self._pending:
                event, name = self._pending.popleft()
                for listener in list(self._listeners):
                    try:
                        listener(event, name)
                    except Exception:  # the change is committed: a listener's failure is its own
                        log.exception("pool listener %r failed on %s %s", listener, event, name)

    def poll_or_log(self) -> None:
        """`poll`, logging a failure (once until it changes) instead of raising: the next period retries."""
        try:
            self.poll()
            self._last_error = ""
        except Exception as e:
            if str(e) != self._last_error:
                log.warning("polling the expert registry for other replicas' changes failed (retrying every "
                            "%g s): %s", self.poll_s, e)
            self._last_error = str(e)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, 2 * self.poll_s))


def _poll_loop(feed_ref: "weakref.ref[PoolChangeFeed]", stop: threading.Event, period_s: float) -> None:
    """Poll every `period_s` until `stop` is set or the feed (its pool) is gone."""
    while not stop.wait(period_s):
        feed = feed_ref()
        if feed is None:
            return
        feed.poll_or_log()
        del feed
