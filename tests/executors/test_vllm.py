"""The vLLM executor with the moerge plugin, on the real base model and the bundled library: every
method it serves gives the reference engine's greedy tokens and usage (fp32), a request's tokens
and routing do not depend on its batch-mates, experts registered at run time join token-level
routing without a restart, and plans it cannot run are refused or fall back with the reason."""

from __future__ import annotations

from dataclasses import replace

import pytest

from moerge.models.generation import SamplingParams
from moerge.plan import PlanError
from moerge.router.base import RoutingDecision, make_router
from tests.helpers import answer_tokens, make_lora, pinned, random_joint_set

BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPTS = ["What is 345 + 210? Answer with the number only.", "Convert to upper case: the cat sat on the mat",
           "Reverse the order of the words: red green blue", "What is the capital of Peru?"]


@pytest.fixture(scope="module")
def system(real_settings, tmp_path_factory):
    from moerge.startup import start
    s = start(real_settings, executor="vllm", pool_dir=tmp_path_factory.mktemp("vllm-pool"), bundled=True,
              vllm_options=dict(dtype="float32", max_num_seqs=32, cpu_threads="all"),
              progress=lambda m: None)
    assert s.local[0].wait_ready(900)
    yield s
    s.shutdown()


def _ids(system, prompts):
    return [system.encode([{"role": "user", "content": p}]) for p in prompts]


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("method", ["base", "pinned", "arrow", "phatgoose", "glider", "joint", "merge-linear",
                                    "merge-cat"])
def test_every_method_gives_the_reference_engines_tokens_on_vllm(system, method):
    vx, ref = system.local
    # forced length: merge-cat (every expert summed) ends at once otherwise, which would prove nothing
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    if method == "pinned":
        decisions = [pinned(n) for n in ("arith_add", "uppercase", "reverse_words", "capital_of")]
    elif method == "glider":   # α = 10: the global bias and the token gates both matter
        router = make_router("glider", system.router_ctx, alpha=10.0)
        decisions = [router.route(p) for p in PROMPTS]
    elif method == "joint":    # a random joint gate set: only the engines' agreement is tested here
        random_joint_set(system.pool, seed=5)
        router = make_router("joint", system.router_ctx)
        decisions = [router.route(p) for p in PROMPTS]
        assert len({tuple(d.module_bias["0.attn"].values()) for d in decisions}) == len(PROMPTS)
    else:
        router = make_router(method, system.router_ctx)
        decisions = [router.route(p) for p in PROMPTS]
    plans = [system.plan(d) for d in decisions]
    assert {p.engine for p in plans} == {"vllm"}, [p.fallback for p in plans]
    got = vx.generate_many(_ids(system, PROMPTS), params, plans)
    want = ref.generate_many(_ids(system, PROMPTS), params, [replace(p, engine="reference") for p in plans])
    assert [answer_tokens(g) for g in got] == [answer_tokens(w) for w in want]
    assert all(len(g.token_ids) == 10 for g in got)
    if plans[0].kind == "token_mixture":
        for g, w in zip(got, want):
            assert set(g.layer_usage) == set(w.layer_usage) == set(range(30))
            for layer, shares in w.layer_usage.items():
                assert g.layer_usage[layer] == pytest.approx(shares, abs=2e-3)


@pytest.mark.real
@pytest.mark.slow
def test_a_request_gets_the_same_tokens_and_routing_alone_and_in_a_hostile_batch(system):
    vx, _ = system.local
    params = SamplingParams(max_tokens=12)
    arrow = make_router("arrow", system.router_ctx)
    phat = make_router("phatgoose", system.router_ctx)
    victims = [system.plan(arrow.route(PROMPTS[1])), system.plan(phat.route(PROMPTS[2])),
               system.plan(pinned("arith_add")), system.plan(None)]
    victim_ids = _ids(system, [PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[3]])
    alone = [vx.generate_many([i], params, [p])[0] for i, p in zip(victim_ids, victims)]
    names = system.pool.names()
    extreme = RoutingDecision("arrow", "token", chosen=names, bias={n: (1e4 if n == "sentiment" else -1e4) for n in names},
                              gating={"gate_set": "arrow", "mode": "arrow", "top_k": 1, "temperature": 0.01})
    tok = vx.tokenizer
    hostile_ids = [tok("zz " * 400)["input_ids"], tok("!!!!" * 100)["input_ids"], victim_ids[0], [5] * 3,
                   _ids(system, ["Ignore the others and answer in French: what is 2+2?"])[0]]
    hostile = [system.plan(extreme), system.plan(pinned("sentiment")), system.plan(phat.route("x " * 50)),
               system.plan(None), system.plan(make_router("merge-cat", system.router_ctx).route("y"))]
    mixed_ids, mixed_plans = [], []
    for i in range(len(victims)):       # interleave victims with hostile requests in one submission
        mixed_ids += [hostile_ids[i], victim_ids[i]]
        mixed_plans += [hostile[i], victims[i]]
    mixed_ids.append(hostile_ids[-1])
    mixed_plans.append(hostile[-1])
    together = vx.generate_many(mixed_ids, params, mixed_plans)
    for k, a in enumerate(alone):
        t = together[2 * k + 1]
        assert answer_tokens(t) == answer_tokens(a)
        assert t.layer_usage == a.layer_usage
    assert alone[0].layer_usage and alone[1].layer_usage        # token-level victims report routing


@pytest.mark.real
def test_the_engine_worker_runs_with_the_configured_onednn_primitive_cache(system, real_settings):
    """oneDNN's process-wide primitive cache (1024 by default) grows the worker by every new batch shape
    for hours under varied load; the worker must start with moerge's bound (docs/reliability.md)."""
    assert real_settings.vllm_onednn_cache == 16
    d = system.local[0].describe()
    assert (d["onednn_primitive_cache"], d["torch_lru_cache"]) == ("16", "16")


@pytest.mark.real
@pytest.mark.slow
def test_an_expert_registered_while_serving_joins_token_routing_without_a_restart(system, base_model_dir, tmp_path):
    vx, ref = system.local
    ad = make_lora(base_model_dir, tmp_path / "late", base_name=BASE_ID, r=4, seed=7, scale_b=0.3)
    system.pool.register_lora(ad, "late-joiner", "a random adapter registered after the engine started")
    try:
        d = make_router("arrow", system.router_ctx).route(PROMPTS[0])
        assert "late-joiner" in d.chosen
        plan = system.plan(d)
        assert plan.engine == "vllm" and "late-joiner" in [e.name for e in plan.experts]
        ids = _ids(system, PROMPTS[:2])
        got = vx.generate_many(ids, SamplingParams(max_tokens=8), [plan, plan])
        want = ref.generate_many(ids, SamplingParams(max_tokens=8), [replace(plan, engine="reference")] * 2)
        assert [answer_tokens(g) for g in got] == [answer_tokens(w) for w in want]
        assert any("late-joiner" in shares for g in got for shares in g.layer_usage.values())
        assert any(k.startswith("late-joiner@") for k in vx.describe()["resident_experts"])
    finally:
        system.pool.remove("late-joiner")


@pytest.mark.real
@pytest.mark.slow
def test_plans_vllm_cannot_run_fall_back_with_the_reason_or_are_refused(system, base_model_dir, tmp_path):
    vx, _ = system.local
    arrow = make_router("arrow", system.router_ctx)
    # more experts than the engine holds at once
    vx.max_resident_experts = 4
    try:
        plan = system.plan(arrow.route(PROMPTS[0]))
    finally:
        vx.max_resident_experts = 64
    assert plan.engine == "reference" and "more than the 4 vllm holds" in plan.fallback
    # an expert whose rank is above the engine's
    ad = make_lora(base_model_dir, tmp_path / "wide", base_name=BASE_ID, r=32, seed=3, scale_b=0.05)
    system.pool.register_lora(ad, "wide", "a rank-32 adapter")
    vx.max_lora_rank = 16
    try:
        plan = system.plan(pinned("wide"))
    finally:
        vx.max_lora_rank = 64
        system.pool.remove("wide")
    assert plan.engine == "reference" and "rank 32" in plan.fallback and "max_lora_rank 16" in plan.fallback
    assert plan.info()["fallback"] == plan.fallback
    # a gate set that does not match the pool: a clear error, nothing runs
    bad = RoutingDecision("phatgoose", "token", chosen=["arith_add", "no-such-gates"],
                          gating={"gate_set": "nonexistent", "mode": "phatgoose", "top_k": 2, "temperature": 1.0})
    with pytest.raises(Exception) as e:
        system.plan(bad)
    assert "no-such-gates" in str(e.value) or "nonexistent" in str(e.value)
    bad2 = replace(bad, chosen=["arith_add", "uppercase"])
    with pytest.raises(PlanError, match="gate set 'nonexistent' does not match the pool"):
        system.plan(bad2)


def _wait_gone(vx, prefix: str, within_s: float = 20.0) -> list[str]:
    """Poll the worker until no resident expert key starts with `prefix` (forgetting runs between steps)."""
    import time
    deadline = time.monotonic() + within_s
    while True:
        keys = vx.describe()["resident_experts"]
        if not any(k.startswith(prefix) for k in keys) or time.monotonic() > deadline:
            return keys
        time.sleep(0.1)


@pytest.mark.real
@pytest.mark.slow
def test_an_expert_removed_and_registered_again_many_times_leaves_nothing_stale_in_the_engine(
        system, base_model_dir, tmp_path):
    """Each cycle registers a new version of `churn`, runs it pinned (a shared plan) and in arrow
    routing (a per-request plan), and removes it. Each removed version must leave the worker, and
    the worker's plans and the executor's shared plan ids must not grow from cycle to cycle. The
    capacity is set to the library plus two, so stale versions could not pile up unseen."""
    vx, _ = system.local
    library = len(system.pool.list())
    capacity = library + 2
    vx._call(vx.engine.collective_rpc("moerge_set_capacity", args=(capacity, "float32")))
    arrow = make_router("arrow", system.router_ctx)
    ids = _ids(system, PROMPTS[:2])
    counts = []
    try:
        for cycle in range(5):
            ad = make_lora(base_model_dir, tmp_path / f"churn{cycle}", base_name=BASE_ID, r=4, seed=100 + cycle,
                           scale_b=0.3)
            system.pool.register_lora(ad, "churn", f"version {cycle} of an expert registered and removed")
            pinned_plan = system.plan(pinned("churn"))
            routed = system.plan(arrow.route(PROMPTS[0]))
            assert pinned_plan.engine == routed.engine == "vllm" and "churn" in [e.name for e in routed.experts]
            got = vx.generate_many(ids, SamplingParams(max_tokens=4), [pinned_plan, routed])
            assert all(g.completion_tokens > 0 for g in got)
            system.pool.remove("churn")
            keys = _wait_gone(vx, "churn@")
            assert not any(k.startswith("churn@") for k in keys), (cycle, keys)
            counts.append((vx.describe()["plans"], vx.adapters.shared_ids()))
    finally:
        vx._call(vx.engine.collective_rpc("moerge_set_capacity", args=(vx.max_resident_experts, "float32")))
        if any(c.name == "churn" for c in system.pool.list()):
            system.pool.remove("churn")
    assert len(set(counts)) == 1, counts            # plans held by the worker and shared plan ids: flat


@pytest.mark.real
@pytest.mark.slow
def test_removing_an_expert_under_a_running_request_lets_it_finish_on_the_old_weights(
        system, base_model_dir, tmp_path):
    """The shared plan of a removed expert is dropped only when its last request ends: the running
    request keeps its tokens (equal to a run with no removal), and afterwards the version is gone."""
    import threading
    import time
    vx, _ = system.local
    ad = make_lora(base_model_dir, tmp_path / "doomed", base_name=BASE_ID, r=4, seed=42, scale_b=0.3)
    system.pool.register_lora(ad, "doomed", "an expert removed while it answers")
    params = SamplingParams(max_tokens=160, temperature=0.0, ignore_eos=True)
    ids = _ids(system, PROMPTS[1:2])
    plan = system.plan(pinned("doomed"))
    want = vx.generate_many(ids, params, [plan])[0]
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("got", vx.generate_many(ids, params, [plan])[0]))
    worker.start()
    time.sleep(1.0)
    assert worker.is_alive(), "the request ended before the removal: make it longer"
    system.pool.remove("doomed")
    time.sleep(0.5)
    still = vx.describe()["resident_experts"]
    worker.join(300)
    assert any(k.startswith("doomed@") for k in still), still     # kept while its request runs
    assert answer_tokens(out["got"]) == answer_tokens(want) and len(answer_tokens(want)) >= 150
    keys = _wait_gone(vx, "doomed@")
    assert not any(k.startswith("doomed@") for k in keys), keys


@pytest.mark.real
@pytest.mark.slow
def test_prefix_caching_reuses_a_block_only_under_the_plan_that_computed_it(system, base_model_dir, tmp_path):
    """The instruction writer's fixed few-shot prefix is prefilled once and then taken from vLLM's prefix
    cache. A cached block is keyed by the plan's LoRA id, which names one set of expert versions: the same
    plan reuses it, and its tokens stay the reference engine's; another expert, a new version of an expert
    under the same name, and a token-level plan (an id per request) get none, and their routing usage
    still covers every token."""
    vx, ref = system.local
    assert vx.engine_kwargs["enable_prefix_caching"] is True
    w = system.router_ctx.instruction_writer
    # queries no other test sends: only the writer's fixed prefix may already be cached, under the base plan
    # (the glider test routes through the writer); nothing below asserts on the first base run
    ids = [system.encode(w._messages(f"Prefix cache probe {i}: what is {17 * i} + 4?")) for i in (3, 5, 7)]
    assert min(map(len, ids)) > 256                 # at least two full blocks of 128 in the shared prefix
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    def run(plan, i):
        g = vx.generate_many([ids[i]], params, [plan])[0]
        want = ref.generate_many([ids[i]], params, [replace(plan, engine="reference")])[0]
        assert answer_tokens(g) == answer_tokens(want), plan.kind
        return g, want

    base = system.plan(None)
    run(base, 0)
    g, _ = run(base, 1)                                 # another query, the same fixed prefix
    assert g.cached_tokens >= 256 and g.cached_tokens < g.prompt_tokens
    g, _ = run(system.plan(pinned("uppercase")), 1)     # the same tokens under an expert: its own blocks
    assert g.cached_tokens == 0
    g, _ = run(system.plan(pinned("uppercase")), 2)     # ... reused by the same expert
    assert g.cached_tokens >= 256

    v1 = make_lora(base_model_dir, tmp_path / "v1", base_name=BASE_ID, r=4, seed=11, scale_b=0.3)
    system.pool.register_lora(v1, "cached", "version 1 of an expert replaced under the same name")
    try:
        run(system.plan(pinned("cached")), 0)
        g, _ = run(system.plan(pinned("cached")), 1)
        assert g.cached_tokens >= 256
        system.pool.remove("cached")
        v2 = make_lora(base_model_dir, tmp_path / "v2", base_name=BASE_ID, r=4, seed=12, scale_b=0.3)
        system.pool.register_lora(v2, "cached", "version 2: other weights, the same name")
        g, _ = run(system.plan(pinned("cached")), 1)    # version 1's blocks of this prompt must not be reused
        assert g.cached_tokens == 0
    finally:
        if any(c.name == "cached" for c in system.pool.list()):
            system.pool.remove("cached")

    arrow = make_router("arrow", system.router_ctx)
    for _ in range(2):                                   # a token-level plan: an id per request, nothing shared
        plan = system.plan(arrow.route("Prefix cache probe: what is 55 + 4?"))
        assert plan.kind == "token_mixture"
        g, want = run(plan, 0)
        assert g.cached_tokens == 0
        assert set(g.layer_usage) == set(want.layer_usage) == set(range(30))
        for layer, shares in want.layer_usage.items():
            assert g.layer_usage[layer] == pytest.approx(shares, abs=2e-3)
