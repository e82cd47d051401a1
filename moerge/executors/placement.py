"""Which LoRA adapters each vLLM server holds, and which server a request goes to: the placement policy.

Policy only: the HTTP calls that load and unload adapters are an `AdapterClient` the caller gives
(moerge/executors/vllm_servers.py). Every method runs on one event loop, so the table needs no lock:
a decision and its bookkeeping happen between two awaits.

The rules, in order, for a request that needs adapter `key`:
1. an engine that holds it (the least busy one, if several);
2. an engine that is loading it: wait for that load (concurrent requests cause one load);
3. an engine with a free slot (the least busy), which loads it;
4. every engine full: the least recently used adapter that no request is using is unloaded, and
   `key` loaded in its slot;
5. every slot busy with requests: wait for one to end, up to `wait_s`, then `SlotsBusyError` (503).
An engine that cannot be reached is marked down (its adapters forgotten) until it answers again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from dataclasses import dataclass, field
from typing import Protocol

from moerge.experts.errors import ExpertError

log = logging.getLogger("moerge.placement")
ADAPTER_KEY = re.compile(r"^(?P<name>.+)@[0-9a-f]{16}$")     # ExpertRef.key: name@sha16


class NoEngineError(ExpertError):
    """No vLLM server is reachable: the request may be sent again once one is back (503)."""
    status = 503
    retry_after = 5


class SlotsBusyError(ExpertError):
    """Every adapter slot of every server is in use by running requests (503)."""
    status = 503
    retry_after = 2


class AdapterLoadError(ExpertError):
    """A vLLM server refused to load an adapter (502): its message says why."""
    status = 502


class EngineDown(Exception):
    """An engine could not be reached (refused, reset, timed out): raised by the client, handled here."""

    def __init__(self, url: str, why: str):
        super().__init__(f"{url}: {why}")
        self.url = url


class AdapterClient(Protocol):
    async def load(self, url: str, key: str, path: str) -> None: ...

    async def unload(self, url: str, key: str) -> None: ...


@dataclass(eq=False)
class Held:
    """One adapter on one engine."""

    key: str
    name: str
    inflight: int = 0
    last_used: int = 0
    loading: asyncio.Future | None = None    # pending while its load runs
    doomed: bool = False                     # its expert was removed: unload when the last request ends


@dataclass(eq=False)
class EngineState:
    url: str
    up: bool = False
    base_model: str = ""                     # the server's served model name
    held: dict[str, Held] = field(default_factory=dict)
    inflight: int = 0
    loads: int = 0
    unloads: dict[str, int] = field(default_factory=dict)   # reason -> count


@dataclass(eq=False)
class Lease:
    """A request's hold on an engine (and on its adapter there): `release` it when the request ends."""

    engine: EngineState
    held: Held | None

    @property
    def model(self) -> str:
        return self.held.key if self.held is not None else self.engine.base_model


class PlacementTable:
    def __init__(self, urls: list[str], slots: int, client: AdapterClient, wait_s: float = 30.0):
        if slots < 1:
            raise ValueError("engine_max_loras must be at least 1")
        self.engines = {u: EngineState(u) for u in urls}
        self.slots = slots
        self.client = client
        self.wait_s = wait_s
        self._tick = itertools.count(1)
        self._waiters: list[asyncio.Future] = []
        self._tasks: set[asyncio.Task] = set()

    # -- requests ---------------------------------------------------------------------------------
    async def acquire(self, key: str | None = None, name: str = "", path: str = "") -> Lease:
        """An engine for the base model (key None) or for adapter `key` (loaded from `path` if needed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while True:
            up = [e for e in self.engines.values() if e.up]
            if not up:
                raise NoEngineError(f"no vLLM server is reachable ({', '.join(self.engines)}): start one, "
                                    "or send the request again once one is back")
            if key is None:
                return self._lease(min(up, key=_busy), None)
            holders = [(e, e.held[key]) for e in up if key in e.held]
            ready = [(e, h) for e, h in holders if h.loading is None]
            if ready:
                return self._lease(*min(ready, key=lambda p: _busy(p[0])))
            if holders:                      # a load is under way: wait for it instead of loading again
                await _settled(holders[0][1].loading)
                continue
            target = self._target(up)
            if target is None:
                await self._wait(deadline, key)
                continue
            lease = self._start_load(*target, key, name, path)
            try:
                loaded = await asyncio.shield(lease.held.loading)
            except BaseException:
                self.release(lease)
                raise
            if loaded:
                return lease
            self.release(lease)          # the engine went down under the load: place it again

    def release(self, lease: Lease) -> None:
        e, h = lease.engine, lease.held
        e.inflight -= 1
        if h is not None:
            h.inflight -= 1
            h.last_used = next(self._tick)
            if h.doomed and h.inflight == 0 and e.held.get(h.key) is h:
                del e.held[h.key]
                self._spawn(self._unload(e, h.key, "removed"))
        self._wake()

    def lost(self, lease: Lease) -> None:
        """The engine says it does not have the lease's adapter (it restarted between health checks):
        forget it there, so the next acquire loads it again."""
        e, h = lease.engine, lease.held
        if h is not None and e.held.get(h.key) is h:
            del e.held[h.key]

    def _lease(self, engine: EngineState, held: Held | None) -> Lease:
        engine.inflight += 1
        if held is not None:
            held.inflight += 1
            held.last_used = next(self._tick)
        return Lease(engine, held)

    def _target(self, up: list[EngineState]) -> tuple[EngineState, Held | None] | None:
        """(engine, adapter to unload there first) for a new adapter, or None when every slot is busy."""
        free = [e for e in up if len(e.held) < self.slots]
        if free:
            return min(free, key=lambda e: (_busy(e), len(e.held))), None
        idle = [(h.last_used, i, e, h) for i, e in enumerate(up) for h in e.held.values()
                if h.inflight == 0 and h.loading is None]
        if not idle:
            return None
        _, _, e, h = min(idle, key=lambda t: t[:2])
        return e, h

    def _start_load(self, engine: EngineState, victim: Held | None, key: str, name: str, path: str) -> Lease:
        """Take the slot for `key` now (before any await) and load it in a task of its own, so a request
        that goes away does not cancel a load that others wait for. The caller holds the returned lease."""
        held = Held(key, name)
        if victim is not None:
            del engine.held[victim.key]
        engine.held[key] = held
        lease = self._lease(engine, held)
        held.loading = self._spawn(self._load(engine, victim, held, path))
        return lease

    async def _load(self, engine: EngineState, victim: Held | None, held: Held, path: str) -> bool:
        """True when `held` is loaded on `engine`; False when the engine went down meanwhile."""
        try:
            if victim is not None:
                await self._unload(engine, victim.key, "lru")
            if engine.held.get(held.key) is held:
                await self.client.load(engine.url, held.key, path)
                engine.loads += 1           # every load the server did, whether or not the table keeps it
        except EngineDown as e:
            if engine.held.get(held.key) is held:     # a held adapter's `loading` is pending or None, never done
                del engine.held[held.key]
            self.mark_down(engine.url, str(e))
            return False
        except Exception:
            if engine.held.get(held.key) is held:
                del engine.held[held.key]
            self._wake()
            raise
        if engine.held.get(held.key) is not held:      # down (and maybe back) while it loaded
            return False
        held.loading = None
        log.info("loaded adapter %s on %s", held.key, engine.url)
        return True

    async def _unload(self, engine: EngineState, key: str, reason: str) -> None:
        try:
            await self.client.unload(engine.url, key)
        except EngineDown as e:
            self.mark_down(engine.url, str(e))
            return
        engine.unloads[reason] = engine.unloads.get(reason, 0) + 1
        log.info("unloaded adapter %s from %s (%s)", key, engine.url, reason)

    async def _wait(self, deadline: float, key: str) -> None:
        loop = asyncio.get_running_loop()
        left = deadline - loop.time()
        if left <= 0:
            raise SlotsBusyError(f"all {self.slots * len(self.engines)} adapter slots of the vLLM servers are in use "
                                 f"by running requests; {key} waited {self.wait_s:g} s for one: send the request "
                                 "again, or add servers (engine_urls) or slots (engine_max_loras and the servers' "
                                 "--max-loras)")
        fut = loop.create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), left)
        except TimeoutError:
            pass
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def _wake(self) -> None:
        for fut in self._waiters:
            _settle(fut)
        self._waiters.clear()

    # -- the pool and the engines -------------------------------------------------------------------
    def forget(self, name: str) -> None:
        """Expert `name` was removed: its adapters leave every engine now, or when their last request ends."""
        for e in self.engines.values():
            for h in [h for h in e.held.values() if h.name == name]:
                if h.inflight == 0 and h.loading is None:
                    del e.held[h.key]
                    self._spawn(self._unload(e, h.key, "removed"))
                else:
                    h.doomed = True

    def mark_down(self, url: str, why: str = "") -> None:
        e = self.engines[url]
        if e.up:
            log.warning("vLLM server %s is down (%s)", url, why)
        e.up = False
        e.held.clear()           # what it holds when it is back is read again then (mark_up)
        self._wake()

    async def mark_up(self, url: str, base_model: str, adapters: list[str]) -> None:
        """The engine answers: adopt the moerge adapters it already holds (up to the slots; the rest are
        unloaded), and serve from it again."""
        e = self.engines[url]
        e.base_model = base_model
        e.held.clear()
        ours = [a for a in adapters if ADAPTER_KEY.match(a)]
        for key in ours[:self.slots]:
            e.held[key] = Held(key, ADAPTER_KEY.match(key)["name"], last_used=next(self._tick))
        e.up = True
        log.info("vLLM server %s is up, holding %d moerge adapter(s)", url, len(e.held))
        self._wake()
        for key in ours[self.slots:]:
            await self._unload(e, key, "reconcile")

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(_retrieved)
        task.add_done_callback(self._tasks.discard)
        return task

    def snapshot(self) -> list[dict]:
        return [{"url": e.url, "up": e.up, "base_model": e.base_model, "inflight": e.inflight,
                 "adapters": {h.key: {"inflight": h.inflight, "loading": h.loading is not None, "removed": h.doomed}
                              for h in e.held.values()},
                 "loads": e.loads, "unloads": dict(e.unloads)} for e in self.engines.values()]


def _busy(e: EngineState) -> int:
    return e.inflight


def _settle(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _retrieved(task: asyncio.Task) -> None:
    """A load whose requests all went away must not log "exception was never retrieved"."""
    if not task.cancelled():
        task.exception()


async def _settled(task: asyncio.Task) -> None:
    """Wait for another request's load (its error, if any, is raised here too)."""
    await asyncio.shield(task)
