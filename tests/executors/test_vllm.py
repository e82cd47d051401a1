"""The vLLM executor on the real base model: same answers as the reference engine, adapters
registered at run time usable at once, mixed batches independent of each other."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from moerge.models.generation import SamplingParams
from moerge.router.base import RoutingDecision
from moerge.service.runtime import Plan
from tests.helpers import make_lora

BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPTS = ["What is 345 + 210? Answer with the number only.", "Name the capital city of Peru.",
           "Convert to upper case: the cat sat on the mat", "Write 47 in words."]


def _plan(expert=None):
    if expert is None:
        return Plan(RoutingDecision("base", "none", abstained=True))
    return Plan(RoutingDecision("pinned", "sequence", chosen=[expert]))


@pytest.fixture(scope="module")
def stack(real_settings, tmp_path_factory, base_model_dir, real_spec, embedder):
    from moerge.executors.reference import ReferenceExecutor
    from moerge.executors.vllm_engine import VllmExecutor
    from moerge.experts.pool import ExpertPool
    tmp = tmp_path_factory.mktemp("vllm")
    pool = ExpertPool(tmp / "pool", f"sqlite:///{tmp}/r.sqlite", real_spec, embed=embedder.encode)
    for i in range(3):
        ad = make_lora(base_model_dir, tmp / f"a{i}", base_name=BASE_ID, seed=i, scale_b=0.05,
                       targets=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
        pool.register_lora(ad, f"a{i}", f"random adapter {i}")
    ref = ReferenceExecutor(base_model_dir, pool)
    vx = VllmExecutor(base_model_dir, pool, fallback=ref, max_loras=4, max_num_seqs=16, dtype="float32")
    assert vx.wait_ready(900)
    yield pool, ref, vx, tmp
    vx.shutdown()


@pytest.mark.real
@pytest.mark.slow
def test_vllm_matches_reference_for_base_and_adapters(stack):
    pool, ref, vx, _ = stack
    params = SamplingParams(max_tokens=12, temperature=0.0)
    agree = total = 0
    for expert in (None, "a0", "a2"):
        for p in PROMPTS:
            msgs = [{"role": "user", "content": p}]
            plan = _plan(expert)
            got = vx.generate(msgs, params, plan)
            assert plan.decision.detail["executor"] == "vllm"
            want = ref.generate(msgs, params, _plan(expert))
            agree += got.text == want.text
            total += 1
    assert agree >= total - 1, f"{agree}/{total} identical greedy answers"  # fp32 both; allow one near-tie


@pytest.mark.real
@pytest.mark.slow
def test_mixed_batch_gives_each_request_its_own_answer(stack):
    pool, ref, vx, _ = stack
    params = SamplingParams(max_tokens=10, temperature=0.0)
    jobs = [(p, e) for p in PROMPTS for e in (None, "a0", "a1", "a2")]
    alone = {j: vx.generate([{"role": "user", "content": j[0]}], params, _plan(j[1])).text for j in jobs}
    with ThreadPoolExecutor(len(jobs)) as ex:
        together = list(ex.map(lambda j: vx.generate([{"role": "user", "content": j[0]}], params, _plan(j[1])).text, jobs))
    assert together == [alone[j] for j in jobs]
    assert len({alone[(PROMPTS[0], e)] for e in (None, "a0", "a1", "a2")}) > 1   # adapters do differ


@pytest.mark.real
@pytest.mark.slow
def test_adapter_registered_at_run_time_is_served_at_once_and_token_plans_fall_back(stack, base_model_dir):
    pool, ref, vx, tmp = stack
    ad = make_lora(base_model_dir, tmp / "late", base_name=BASE_ID, seed=9, scale_b=0.05)
    pool.register_lora(ad, "late", "registered after start")
    plan = _plan("late")
    out = vx.generate([{"role": "user", "content": PROMPTS[1]}], SamplingParams(max_tokens=8), plan)
    assert plan.decision.detail["executor"] == "vllm" and out.completion_tokens > 0
    token_plan = Plan(RoutingDecision("arrow", "token", chosen=["a0", "a1"]))
    with pytest.raises(ValueError, match="router"):   # reached the reference engine, which needs the router
        vx.generate([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4), token_plan)
    assert token_plan.decision.detail["executor"] == "reference"


def test_cpu_threads_setting_binds_cores_or_is_refused(monkeypatch):
    import os

    from pydantic import ValidationError

    from moerge.config import Settings
    from moerge.executors.vllm_engine import bind_cpu_threads
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    bind_cpu_threads("auto")                       # vLLM's own default: nothing set
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    bind_cpu_threads("all")
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == f"0-{os.cpu_count() - 1}"
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    with pytest.raises(ValueError):
        bind_cpu_threads("everything")
    with pytest.raises(ValidationError):
        Settings(vllm_cpu_threads="lots")
    assert Settings(vllm_cpu_threads="0,1").vllm_cpu_threads == "0,1"
