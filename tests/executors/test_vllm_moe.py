"""ESFT adapters served over the shared MoE base in vLLM, on the real base model (issue 11).

An MoE base upcycled from three bundled experts; two ESFT adapters registered in the pool (their
experts perturbed, so they change the answers). Through rerouting, a request with an adapter gives
the same greedy tokens as a standalone checkpoint with that adapter's experts merged in; in a batch
with the other adapter's requests and bare-base requests, its tokens equal running alone; adapters
are evicted and reloaded when slots run out; and the service plans ESFT experts, pinned or routed,
onto the MoE engine."""

from __future__ import annotations

import time

import pytest
import torch

from moerge.models.generation import SamplingParams
from moerge.moe.esft import synthetic_esft
from moerge.router.base import make_router
from tests.helpers import pinned

PROMPTS = ["What is 345 + 210? Answer with the number only.", "Convert to upper case: market street",
           "What is the capital of Peru?", "Write one sentence about the sea."]
MAP_A = {0: [1], 5: [0, 2], 17: [1, 3], 29: [2]}
MAP_B = {layer: [2] for layer in range(0, 30, 3)}
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def moe_system(real_settings, tmp_path_factory):
    from moerge.moe.build import build_moe
    from moerge.startup import attach_moe, start
    s = start(real_settings, executor="reference", pool_dir=tmp_path_factory.mktemp("moe-pool"), bundled=True,
              progress=lambda m: None)
    base = build_moe(s.pool, s.assets.base_model, ["arith_add", "uppercase", "capital_of"], prompts_per_expert=4,
                     progress=lambda m: None)
    root = tmp_path_factory.mktemp("esft")
    s.pool.register_esft(synthetic_esft(base, root / "a", MAP_A, 1), "esft_a",
                         "Answers questions about tide tables and the sea's depth in fathoms.",
                         examples=["How deep is the sea here in fathoms?", "When is high tide at the harbour?"])
    s.pool.register_esft(synthetic_esft(base, root / "b", MAP_B, 2), "esft_b", "Writes limericks about cheese.")
    s.settings = s.settings.model_copy(update={"moe_max_adapters": 2})
    attach_moe(s, dict(dtype="float32", max_num_seqs=16, cpu_threads="all"))
    moe = s.local[1]
    assert moe.name == "vllm-moe" and moe.wait_ready(900), moe.error
    yield s, base
    s.shutdown()


def _ids(system, prompts):
    return [system.encode([{"role": "user", "content": p}]) for p in prompts]


def _tokens(gens):
    return [list(g.token_ids) for g in gens]


@pytest.mark.real
@pytest.mark.slow
def test_an_esft_adapter_served_by_rerouting_equals_its_merged_checkpoint_and_ignores_its_batch(moe_system,
                                                                                              tmp_path):
    from transformers import AutoModelForCausalLM

    from moerge.moe.esft import load_esft, merged_checkpoint
    system, base = moe_system
    moe = system.local[1]
    pa, pb = system.plan(pinned("esft_a")), system.plan(pinned("esft_b"))
    pm = system.plan(make_router("moe", system.router_ctx).route(PROMPTS[0]))
    assert (pa.kind, pa.engine, pb.kind, pm.kind, pm.engine) == ("esft", "vllm-moe", "esft", "moe", "vllm-moe")
    ids = _ids(system, PROMPTS)
    alone_a = _tokens(moe.generate_many(ids, PARAMS, [pa] * 4))
    alone_b = _tokens(moe.generate_many(ids, PARAMS, [pb] * 4))
    alone_m = _tokens(moe.generate_many(ids, PARAMS, [pm] * 4))
    assert alone_a != alone_m and alone_b != alone_m      # the adapters change the answers
    mixed = _tokens(moe.generate_many(ids * 3, PARAMS, [pa, pm, pb, pa] + [pm, pb, pa, pm] + [pb, pa, pm, pb]))
    plans = [pa, pm, pb, pa, pm, pb, pa, pm, pb, pa, pm, pb]
    want = {id(pa): alone_a, id(pb): alone_b, id(pm): alone_m}
    assert mixed == [want[id(p)][i % 4] for i, p in enumerate(plans)]
    # the reference: a standalone checkpoint with esft_a's experts merged in, greedy in transformers (fp32;
    # vLLM's fp32 greedy tokens equal transformers' for the dense model too: tests/executors/test_vllm.py)
    card = system.pool.get("esft_a")
    merged = merged_checkpoint(base, load_esft(system.pool.esft_dir(card), base), tmp_path / "merged_a")
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    for prompt, served in zip(ids, alone_a):
        answer = served[:served.index(2) + 1] if 2 in served else served     # up to the end of turn
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=len(answer), do_sample=False,
                                 eos_token_id=2, pad_token_id=2)
        assert out[0, len(prompt):].tolist() == answer


@pytest.mark.real
@pytest.mark.slow
def test_adapters_past_the_slots_evict_the_least_recently_used_and_come_back_right(moe_system, tmp_path):
    system, base = moe_system
    moe = system.local[1]
    ids = _ids(system, PROMPTS[:2])
    card = system.pool.register_esft(synthetic_esft(base, tmp_path / "c", {3: [0], 20: [1, 2]}, 3), "esft_c")
    pa, pc = system.plan(pinned("esft_a")), system.plan(pinned("esft_c"))
    first = _tokens(moe.generate_many(ids, PARAMS, [pa] * 2))
    before = moe.describe()["moe"]
    for plan in (pc, system.plan(pinned("esft_b")), pa):      # 3 adapters through 2 slots (the engine's setting)
        moe.generate_many(ids, PARAMS, [plan] * 2)
    after = moe.describe()["moe"]
    assert after["max_adapters"] == 2 and len(after["resident_adapters"]) == 2
    assert after["adapter_evictions"] >= before["adapter_evictions"] + 2
    assert _tokens(moe.generate_many(ids, PARAMS, [pa] * 2)) == first
    moe.generate_many(ids, PARAMS, [pc] * 2)
    assert any(k.startswith("esft_c@") for k in moe.describe()["moe"]["resident_adapters"])
    system.pool.remove(card.name)       # a removed adapter leaves the engine's rows (between steps)
    deadline = time.monotonic() + 30
    while any(k.startswith("esft_c@") for k in moe.describe()["moe"]["resident_adapters"]):
        assert time.monotonic() < deadline, moe.describe()["moe"]
        time.sleep(0.2)


@pytest.mark.real
@pytest.mark.slow
def test_prefix_caching_on_the_moe_engine_keeps_each_adapters_tokens_through_evictions(moe_system, tmp_path):
    """A long shared prefix is prefilled once per plan: the bare MoE base and an ESFT adapter each reuse their own
    blocks and never each other's, and an adapter evicted from its rows and loaded again (into whichever rows are
    free) still answers with its merged checkpoint's tokens over its cached prefix."""
    from transformers import AutoModelForCausalLM

    from moerge.moe.esft import load_esft, merged_checkpoint
    system, base = moe_system
    moe = system.local[1]
    assert moe.engine_kwargs["enable_prefix_caching"] is True
    rules = " ".join(f"Rule {i}: a tide of kind {i} rises {i + 2} fathoms at {6 + i % 5} o'clock." for i in range(24))
    ids = [system.encode([{"role": "system", "content": rules}, {"role": "user", "content": q}])
           for q in ("How high is kind 3?", "When does kind 4 rise?", "Which kind rises 7 fathoms?")]
    assert min(map(len, ids)) > 300
    pa, pm = system.plan(pinned("esft_a")), system.plan(make_router("moe", system.router_ctx).route(PROMPTS[0]))
    assert (pa.kind, pm.kind) == ("esft", "moe")
    moe.generate_many(ids[:1], PARAMS, [pm])
    assert moe.generate_many(ids[1:2], PARAMS, [pm])[0].cached_tokens >= 256      # the bare base reuses its own
    got = [moe.generate_many(ids[i:i + 1], PARAMS, [pa])[0] for i in range(2)]
    assert got[0].cached_tokens == 0 and got[1].cached_tokens >= 256               # its own blocks, not the base's
    card = system.pool.register_esft(synthetic_esft(base, tmp_path / "d", {7: [1], 25: [0, 3]}, 4), "esft_d")
    try:
        before = moe.describe()["moe"]["adapter_evictions"]
        for plan in (system.plan(pinned("esft_d")), system.plan(pinned("esft_b"))):   # 2 slots: esft_a leaves
            moe.generate_many(ids[2:3], PARAMS, [plan])
        assert moe.describe()["moe"]["adapter_evictions"] >= before + 1
        assert not any(k.startswith("esft_a@") for k in moe.describe()["moe"]["resident_adapters"])
        again = moe.generate_many(ids[:2], PARAMS, [pa, pa])
    finally:
        system.pool.remove(card.name)
    assert all(g.cached_tokens >= 256 for g in again)
    merged = merged_checkpoint(base, load_esft(system.pool.esft_dir(system.pool.get("esft_a")), base),
                               tmp_path / "merged_a")
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    for prompt, served in zip(ids[:2], _tokens(again)):
        answer = served[:served.index(2) + 1] if 2 in served else served
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=len(answer), do_sample=False,
                                 eos_token_id=2, pad_token_id=2)
        assert out[0, len(prompt):].tolist() == answer
    assert _tokens(again) == _tokens(got)


@pytest.mark.real
@pytest.mark.slow
def test_auto_routing_picks_an_esft_expert_by_its_card(moe_system):
    system, _ = moe_system
    d = make_router("embed", system.router_ctx).route("How many fathoms deep is the sea near the harbour at high tide?")
    assert d.chosen == ["esft_a"], d.to_json()
    plan = system.plan(d)
    assert (plan.kind, plan.engine) == ("esft", "vllm-moe")
    gen, ran = system.generate([{"role": "user", "content": "How deep is the sea?"}], PARAMS, plan)
    assert ran.kind == "esft" and gen.completion_tokens == 12
