"""The adapter placement policy without servers: a fake adapter client that records loads and
unloads and can hold a load open or refuse to connect. Fast; the same rules run against real vLLM
servers in test_vllm_servers.py."""

from __future__ import annotations

import asyncio

import pytest

from moerge.executors.placement import (AdapterLoadError, EngineDown, NoEngineError, PlacementTable,
                                        SlotsBusyError)

A, B = "http://a", "http://b"


class FakeClient:
    def __init__(self):
        self.calls: list[tuple] = []
        self.gate: asyncio.Event | None = None       # loads wait on it when set
        self.down: set[str] = set()
        self.refuse: set[str] = set()

    async def load(self, url, key, path):
        if url in self.down:
            raise EngineDown(url, "refused")
        if key in self.refuse:
            raise AdapterLoadError(f"{url} did not load {key}")
        if self.gate is not None:
            await self.gate.wait()
        self.calls.append(("load", url, key))

    async def unload(self, url, key):
        if url in self.down:
            raise EngineDown(url, "refused")
        self.calls.append(("unload", url, key))

    def loads(self):
        return [c for c in self.calls if c[0] == "load"]


def key(name: str) -> str:
    return f"{name}@{'0' * 16}"


async def table(urls=(A, B), slots=2, wait_s=5.0) -> tuple[PlacementTable, FakeClient]:
    client = FakeClient()
    t = PlacementTable(list(urls), slots, client, wait_s)
    for u in urls:
        await t.mark_up(u, "base", [])
    return t, client


async def use(t: PlacementTable, name: str):
    lease = await t.acquire(key(name), name, f"/pool/{name}")
    t.release(lease)
    return lease.engine.url


def run(coro):
    """Each test within 10 s: a placement loop that never ends fails instead of hanging."""
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_request_goes_to_the_engine_that_holds_its_adapter():
    async def go():
        t, c = await table()
        first = await use(t, "x")
        assert [await use(t, "x") for _ in range(5)] == [first] * 5
        assert len(c.loads()) == 1
    run(go())


def test_new_adapters_go_to_the_least_loaded_engine_with_a_free_slot():
    async def go():
        t, c = await table()
        busy = await t.acquire(key("x"), "x", "/x")           # x on one engine, a request running on it
        other = await use(t, "y")
        assert other != busy.engine.url
        t.release(busy)
    run(go())


def test_a_full_pool_of_engines_unloads_the_least_recently_used_idle_adapter():
    async def go():
        t, c = await table(slots=2)
        for n in ("p", "q", "r", "s"):
            await use(t, n)
        await use(t, "p")                                    # p is recent again; q is now the oldest
        where_q = next(u for u, e in t.engines.items() if key("q") in e.held)
        assert await use(t, "z") == where_q
        assert ("unload", where_q, key("q")) in c.calls
        assert t.engines[where_q].unloads == {"lru": 1}
        assert all(len(e.held) == 2 for e in t.engines.values())
    run(go())


def test_an_adapter_with_a_request_in_flight_is_never_unloaded():
    async def go():
        t, c = await table(urls=(A,), slots=2)
        running = await t.acquire(key("old"), "old", "/old")     # the least recently used, but in flight
        await use(t, "mid")
        await use(t, "new")                                    # evicts mid, not old
        assert ("unload", A, key("old")) not in c.calls
        assert ("unload", A, key("mid")) in c.calls
        assert key("old") in t.engines[A].held
        t.release(running)
    run(go())


def test_concurrent_requests_for_one_adapter_cause_one_load():
    async def go():
        t, c = await table()
        c.gate = asyncio.Event()
        tasks = [asyncio.create_task(t.acquire(key("x"), "x", "/x")) for _ in range(8)]
        await asyncio.sleep(0.05)
        c.gate.set()
        leases = await asyncio.gather(*tasks)
        assert len(c.loads()) == 1
        assert len({lease.engine.url for lease in leases}) == 1
        for lease in leases:
            t.release(lease)
    run(go())


def test_every_slot_busy_waits_for_one_and_then_fails_with_a_503():
    async def go():
        t, c = await table(urls=(A,), slots=1, wait_s=0.3)
        running = await t.acquire(key("x"), "x", "/x")
        with pytest.raises(SlotsBusyError, match="in use by running requests") as e:
            await t.acquire(key("y"), "y", "/y")
        assert e.value.status == 503
        waiting = asyncio.create_task(t.acquire(key("y"), "y", "/y"))
        await asyncio.sleep(0.05)
        t.release(running)                                     # the slot frees: y gets it
        lease = await waiting
        assert lease.model == key("y") and ("unload", A, key("x")) in c.calls
        t.release(lease)
    run(go())


def test_an_unreachable_engine_is_marked_down_and_requests_go_to_the_other():
    async def go():
        t, c = await table()
        c.down.add(A)
        urls = {await use(t, n) for n in ("x", "y", "z")}
        assert urls == {B}
        assert not t.engines[A].up
        await t.mark_up(A, "base", [])
        c.down.clear()
        t.engines[B].inflight = 5                               # B is busy: a new adapter goes to A again
        assert await use(t, "w") == A
    run(go())


def test_no_engine_up_is_a_503_that_says_so():
    async def go():
        t, c = await table()
        t.mark_down(A)
        t.mark_down(B)
        with pytest.raises(NoEngineError, match="no vLLM server is reachable") as e:
            await t.acquire(None)
        assert e.value.status == 503
    run(go())


def test_a_refused_load_fails_every_waiting_request_once_and_frees_the_slot():
    async def go():
        t, c = await table()
        c.refuse.add(key("bad"))
        results = await asyncio.gather(*[t.acquire(key("bad"), "bad", "/bad") for _ in range(3)],
                                       return_exceptions=True)
        assert all(isinstance(r, AdapterLoadError) for r in results)
        assert all(len(e.held) == 0 and e.inflight == 0 for e in t.engines.values())
    run(go())


def test_a_removed_expert_leaves_the_engines_when_its_last_request_ends():
    async def go():
        t, c = await table()
        await use(t, "gone")
        running = await t.acquire(key("busy"), "busy", "/busy")
        t.forget("gone")
        t.forget("busy")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert any(u[2] == key("gone") for u in c.calls if u[0] == "unload")
        assert not any(u[2] == key("busy") for u in c.calls if u[0] == "unload")
        t.release(running)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert any(u[2] == key("busy") for u in c.calls if u[0] == "unload")
        assert sum(e.unloads.get("removed", 0) for e in t.engines.values()) == 2
        assert all(not e.held for e in t.engines.values())
    run(go())


def test_an_engine_coming_up_adopts_the_adapters_it_holds_up_to_its_slots():
    async def go():
        client = FakeClient()
        t = PlacementTable([A], 2, client)
        await t.mark_up(A, "base", [key("a"), "someone-elses-lora", key("b"), key("c")])
        assert set(t.engines[A].held) == {key("a"), key("b")}
        assert client.calls == [("unload", A, key("c"))]
        assert t.engines[A].unloads == {"reconcile": 1}
        assert await use(t, "a") == A and not client.loads()
    run(go())


def test_a_request_that_goes_away_does_not_cancel_a_load_others_wait_for():
    async def go():
        t, c = await table()
        c.gate = asyncio.Event()
        first = asyncio.create_task(t.acquire(key("x"), "x", "/x"))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(t.acquire(key("x"), "x", "/x"))
        await asyncio.sleep(0.01)
        first.cancel()
        c.gate.set()
        lease = await second
        assert len(c.loads()) == 1 and lease.model == key("x")
        t.release(lease)
        assert sum(e.inflight for e in t.engines.values()) == 0
    run(go())
