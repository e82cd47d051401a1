"""The vLLM engine under faults, on the real base model: a closed stream aborts its engine request, a
re-registered expert never answers with its old weights, and a killed engine process turns /readyz
503, fails the request in flight with a clear error (no hang), and is restarted by the supervisor."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import replace

import httpx
import psutil
import pytest

from moerge.models.generation import SamplingParams
from tests.helpers import answer_tokens, make_lora, pinned

BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Convert to upper case: the cat sat on the mat"}]


@pytest.fixture(scope="module")
def system(real_settings, tmp_path_factory):
    from moerge.startup import start
    s = start(real_settings, executor="vllm", pool_dir=tmp_path_factory.mktemp("faults-pool"), bundled=False,
              with_router=False, vllm_options=dict(dtype="float32", max_num_seqs=8),
              progress=lambda m: None)
    assert s.local[0].wait_ready(900)
    yield s
    s.shutdown()


@pytest.mark.real
@pytest.mark.slow
def test_closing_a_stream_aborts_its_engine_request(system):
    vx, _ = system.local

    async def run():
        params = SamplingParams(max_tokens=400, ignore_eos=True)
        stream = vx.astream(MESSAGES, params, system.plan(None))
        first = await stream.__anext__()
        busy = vx.engine.output_processor.get_num_unfinished_requests()
        await stream.aclose()
        for _ in range(100):            # the abort travels to the engine loop and back
            if vx.engine.output_processor.get_num_unfinished_requests() == 0:
                break
            await asyncio.sleep(0.05)
        return first, busy, vx.engine.output_processor.get_num_unfinished_requests()

    first, busy, after = asyncio.run(run())
    assert first.text and busy == 1
    assert after == 0


@pytest.mark.real
@pytest.mark.slow
def test_once_an_expert_is_replaced_no_request_gets_its_old_weights(system, base_model_dir, tmp_path):
    vx, ref = system.local
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    old = make_lora(base_model_dir, tmp_path / "old", base_name=BASE_ID, r=4, seed=11, scale_b=0.3)
    new = make_lora(base_model_dir, tmp_path / "new", base_name=BASE_ID, r=4, seed=12, scale_b=0.3)

    def answer():
        plan = system.plan(pinned("swapped"))
        assert plan.engine == "vllm", plan.fallback
        got = asyncio.run(vx.agenerate(MESSAGES, params, plan))
        want = ref.generate(MESSAGES, params, replace(plan, engine="reference"))
        return plan, got, want

    system.pool.register_lora(old, "swapped", "first weights")
    try:
        old_plan, old_got, old_want = answer()
    finally:
        system.pool.remove("swapped")
    system.pool.register_lora(new, "swapped", "second weights, same name")     # acknowledged here
    try:
        new_plan, new_got, new_want = answer()
    finally:
        system.pool.remove("swapped")
    assert answer_tokens(old_got) == answer_tokens(old_want)
    assert answer_tokens(old_want) != answer_tokens(new_want)          # the two weight sets answer differently
    assert old_plan.experts[0].key != new_plan.experts[0].key
    assert answer_tokens(new_got) == answer_tokens(new_want)           # the new weights, never the old


def _engine_core_pids() -> list[int]:
    return [p.pid for p in psutil.Process().children(recursive=True)
            if "EngineCore" in p.name() or any("EngineCore" in a for a in (p.cmdline() or []))]


@pytest.mark.real
@pytest.mark.slow
def test_a_killed_engine_fails_requests_in_flight_then_is_restarted(system):
    from moerge.executors.vllm_engine import EngineUnavailableError
    from moerge.service.app import create_app
    from moerge.service.runtime import Runtime

    vx, _ = system.local
    params = SamplingParams(max_tokens=8)
    before = vx.generate(MESSAGES, params, system.plan(None))
    app = create_app(Runtime(system))
    pids = _engine_core_pids()
    assert pids, "no EngineCore process under this test"

    async def kill_under_a_request():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            ready_before = await client.get("/readyz")
            long = asyncio.ensure_future(vx.agenerate(MESSAGES, SamplingParams(max_tokens=2000, ignore_eos=True),
                                                      system.plan(None)))
            await asyncio.sleep(1.0)
            for pid in pids:
                psutil.Process(pid).send_signal(signal.SIGKILL)
            try:
                await asyncio.wait_for(long, 120)
                failure = None
            except EngineUnavailableError as e:
                failure = e
            dead = await client.get("/readyz")
            return ready_before, failure, dead

    ready_before, failure, dead = asyncio.run(kill_under_a_request())
    assert ready_before.status_code == 200
    assert isinstance(failure, EngineUnavailableError) and "died" in failure.message
    assert dead.status_code == 503 and dead.headers["retry-after"]
    deadline = time.monotonic() + 900
    while not vx.ready() and time.monotonic() < deadline:
        time.sleep(1)
    assert vx.ready() and vx.restarts == 1 and vx.error is None
    assert set(_engine_core_pids()).isdisjoint(pids)

    async def after_restart():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get("/readyz"), await vx.agenerate(MESSAGES, params, system.plan(None))

    ready_after, again = asyncio.run(after_restart())
    assert ready_after.status_code == 200
    assert answer_tokens(again) == answer_tokens(before)
