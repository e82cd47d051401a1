"""The routed reference engine: equivalences with merged weights, and batch independence."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moerge.executors.routed import RoutedEngine
from moerge.experts.lora import base_spec_from_folder, load_lora
from moerge.experts.pool import ExpertPool
from moerge.kernels.merge import merge_cat, merge_linear, merge_ties
from moerge.models.generation import SamplingParams
from moerge.plan import EngineCaps, Engines, make_plan
from moerge.router.base import RoutingDecision
from tests.helpers import make_lora

NAMES = ["e0", "e1", "e2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_chat_base, embedder):
    tmp = tmp_path_factory.mktemp("routed")
    spec = base_spec_from_folder(str(tiny_chat_base), "tiny/llama")
    pool = ExpertPool(tmp / "pool", f"sqlite:///{tmp}/r.sqlite", spec, embed=embedder.encode)
    targets = [("q_proj", "v_proj", "up_proj", "down_proj"), ("q_proj", "o_proj"), ("gate_proj", "down_proj", "k_proj")]
    for i, name in enumerate(NAMES):
        ad = make_lora(tiny_chat_base, tmp / name, base_name="tiny/llama", r=2 + 2 * i, seed=10 + i,
                       targets=targets[i], scale_b=0.3)
        pool.register_lora(ad, name, f"expert {i}")
    engine = RoutedEngine.from_folder(tiny_chat_base)
    adapters = {n: load_lora(pool.adapter_dir(pool.get(n)), spec) for n in NAMES}
    return pool, engine, adapters, tiny_chat_base


def _merged_model(base_dir, deltas: dict[str, torch.Tensor]):
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for module, d in deltas.items():
            model.get_submodule(module).weight += d
    return model


def _row(engine, pool, decision):
    """The reference engine's row plan for a decision, through moerge.plan like every caller."""
    return engine.row_plan(make_plan(decision, pool, Engines([EngineCaps("reference")])))


def _logits_engine(engine, plan, ids):
    engine.state.rows = [plan]
    try:
        with torch.inference_mode():
            return engine.model(input_ids=ids).logits
    finally:
        engine.state.rows = []


def _ids(base_dir):
    tok = AutoTokenizer.from_pretrained(base_dir)
    return torch.tensor([tok("route every token through the experts")["input_ids"]])


@pytest.mark.real
def test_one_expert_weight_one_equals_adapter_merged_into_base(setup):
    pool, engine, adapters, base = setup
    ids = _ids(base)
    plan = _row(engine, pool, RoutingDecision("pinned", "sequence", chosen=["e1"]))
    got = _logits_engine(engine, plan, ids)
    ad = adapters["e1"]
    want = _merged_model(base, {m: ad.delta(m) for m in ad.weights})(input_ids=ids).logits
    assert torch.allclose(got, want, atol=2e-4), float((got - want).abs().max())
    base_logits = _logits_engine(engine, engine.row_plan(None), ids)
    assert (base_logits - want).abs().max() > 1e-2   # the adapter does change the output


@pytest.mark.real
@pytest.mark.parametrize("method,fn", [("merge-cat", merge_cat), ("merge-linear", merge_linear),
                                       ("merge-ties", merge_ties)])
def test_static_merges_equal_explicit_merged_weights(setup, method, fn):
    pool, engine, adapters, base = setup
    ids = _ids(base)
    got = _logits_engine(engine, _row(engine, pool, RoutingDecision(method, "static", chosen=NAMES)), ids)
    modules = sorted({m for ad in adapters.values() for m in ad.weights})
    deltas = {m: fn([ad.delta(m) for ad in adapters.values() if m in ad.weights]) for m in modules}
    if method == "merge-linear":  # the mean over all experts: a module one expert lacks counts as zero
        deltas = {m: torch.stack([ad.delta(m) if m in ad.weights else torch.zeros_like(deltas[m])
                                  for ad in adapters.values()]).mean(0) for m in modules}
    want = _merged_model(base, deltas)(input_ids=ids).logits
    assert torch.allclose(got, want, atol=2e-4), float((got - want).abs().max())


@pytest.mark.real
def test_a_dense_plan_on_a_fresh_engine_applies_its_update(setup):
    """TIES may be the first plan an engine sees (vLLM runs everything else): its modules must be routed."""
    pool, _, adapters, base = setup
    fresh = RoutedEngine.from_folder(base)
    ids = _ids(base)
    got = _logits_engine(fresh, _row(fresh, pool, RoutingDecision("merge-ties", "static", chosen=NAMES)), ids)
    modules = sorted({m for ad in adapters.values() for m in ad.weights})
    deltas = {m: merge_ties([ad.delta(m) for ad in adapters.values() if m in ad.weights]) for m in modules}
    want = _merged_model(base, deltas)(input_ids=ids).logits
    assert torch.allclose(got, want, atol=2e-4)
    assert not torch.allclose(got, _merged_model(base, {})(input_ids=ids).logits, atol=1e-3)


@pytest.mark.real
def test_all_experts_equal_weights_equals_cat_merge_scaled(setup):
    pool, engine, adapters, base = setup
    ids = _ids(base)
    from moerge.plan import ExecutionPlan, expert_ref
    w = 0.25
    plan = ExecutionPlan("static_mixture", tuple(expert_ref(pool, n) for n in NAMES), (w,) * 3, engine="reference")
    got = _logits_engine(engine, engine.row_plan(plan), ids)
    modules = sorted({m for ad in adapters.values() for m in ad.weights})
    deltas = {m: w * merge_cat([ad.delta(m) for ad in adapters.values() if m in ad.weights]) for m in modules}
    want = _merged_model(base, deltas)(input_ids=ids).logits
    assert torch.allclose(got, want, atol=2e-4)


def _token_decision(mode="arrow", bias=None, top_k=2):
    return RoutingDecision(mode, "token", chosen=NAMES, bias=bias or {},
                           gating={"gate_set": "arrow", "mode": "arrow", "top_k": top_k, "temperature": 1.0})


def _token_plan(engine, pool, mode="arrow", bias=None, top_k=2):
    d = _token_decision(mode, bias, top_k)
    return _row(engine, pool, d), d


@pytest.mark.real
def test_request_gets_same_tokens_alone_and_batched_with_adversarial_requests(setup):
    pool, engine, adapters, base = setup
    tok = engine.tok
    params = SamplingParams(max_tokens=12, temperature=0.0)
    victim = engine.encode_chat([{"role": "user", "content": "a request that routes per token"}])
    plan, _ = _token_plan(engine, pool)
    alone = engine.generate_batch([victim], [plan], params)[0]
    # adversaries: very long prompts, repeated tokens, extreme biases towards one expert, pinned experts
    hostile = [tok("zz " * 120)["input_ids"], tok("!!!!" * 40)["input_ids"], victim, [5] * 3]
    hostile_plans = [_token_plan(engine, pool, bias={"e0": 1e4})[0],
                     _row(engine, pool, RoutingDecision("pinned", "sequence", chosen=["e2"])),
                     _token_plan(engine, pool, mode="arrow", top_k=1)[0],
                     _row(engine, pool, RoutingDecision("merge-ties", "static", chosen=NAMES))]
    plan2, _ = _token_plan(engine, pool)
    batched = engine.generate_batch([hostile[0], victim, *hostile[1:]],
                                    [hostile_plans[0], plan2, *hostile_plans[1:]], params)[1]
    assert batched.tokens == alone.tokens
    assert len(alone.tokens) > 0


@pytest.mark.real
def test_token_routing_fills_per_layer_usage(setup):
    pool, engine, adapters, base = setup
    plan, decision = _token_plan(engine, pool)
    prompt = engine.encode_chat([{"role": "user", "content": "hello"}])
    res = engine.generate_batch([prompt], [plan], SamplingParams(max_tokens=4))[0]
    assert set(res.layer_usage) == {0, 1}
    for layer, shares in res.layer_usage.items():
        assert abs(sum(shares.values()) - 1) < 1e-3 and set(shares) <= set(NAMES)


@pytest.mark.real
def test_bias_towards_one_expert_routes_every_token_to_it(setup):
    pool, engine, adapters, base = setup
    plan, _ = _token_plan(engine, pool, bias={"e2": 1e3}, top_k=1)
    prompt = engine.encode_chat([{"role": "user", "content": "hello"}])
    res = engine.generate_batch([prompt], [plan], SamplingParams(max_tokens=3))[0]
    # Per layer, 7 modules route tokens (the union of the experts' targets). e2 adapts k, gate and
    # down: with a huge bias and top-1 it takes all their mass, and cannot be picked elsewhere.
    assert set(res.layer_usage) == {0, 1}
    for shares in res.layer_usage.values():
        assert shares["e2"] == pytest.approx(3 / 7, abs=1e-3)


@pytest.mark.real
def test_rows_sharing_gates_are_gated_together_but_keep_their_own_bias(setup):
    """Rows with the same gate tensors go through one gating matmul per layer; each row's bias,
    tokens and usage must still be what it gets alone."""
    pool, engine, adapters, base = setup
    params = SamplingParams(max_tokens=10, temperature=0.0)
    prompts = [engine.encode_chat([{"role": "user", "content": c}])
               for c in ("a request that routes per token", "zz", "another one, much longer than the first one was")]
    biases = [{}, {"e0": 1e4}, {"e2": 1e4, "e1": -1e4}]

    def plan(b):
        return _row(engine, pool, _token_decision(bias=b))   # same experts: rows share the gate tensors

    alone = [engine.generate_batch([p], [plan(b)], params)[0] for p, b in zip(prompts, biases)]
    together = engine.generate_batch(prompts, [plan(b) for b in biases], params)
    assert len({len(p) for p in prompts}) == 3          # different lengths: left padding in the batch
    for a, t in zip(alone, together):
        assert t.tokens == a.tokens
        assert t.layer_usage.keys() == a.layer_usage.keys()
        for layer in a.layer_usage:
            assert t.layer_usage[layer] == pytest.approx(a.layer_usage[layer], abs=1e-3)
    # the biased rows really are steered: e0 takes top weight wherever it can be picked
    assert all(shares.get("e0", 0) > 0.3 for shares in together[1].layer_usage.values())


def _exec(pool, decision):
    return make_plan(decision, pool, Engines([EngineCaps("reference")]))


@pytest.mark.real
def test_a_later_rows_new_expert_does_not_move_an_earlier_rows_experts(setup):
    """Row plans of one batch are made together: a row that brings a new expert restacks the
    experts, and must not leave an earlier row pointing at another expert's slot."""
    from moerge.executors.reference import ReferenceExecutor
    pool, _, _, base = setup
    params = SamplingParams(max_tokens=8, temperature=0.0)
    prompt = [{"role": "user", "content": "say something about the weather"}]
    pin = {n: _exec(pool, RoutingDecision("pinned", "sequence", chosen=[n])) for n in NAMES}
    merge = _exec(pool, RoutingDecision("merge-linear", "static", chosen=["e0", "e1"]))
    alone = ReferenceExecutor(base).generate(prompt, params, pin["e2"])
    ex = ReferenceExecutor(base)
    ids = ex.engine.encode_chat(prompt)
    ex.generate_many([ids, ids], params, [pin["e0"], pin["e2"]])          # resident: e0, e2
    # row 0 needs e2 (resident); row 1 needs e0 (resident, moved to the end) and e1 (new): a restack
    got = ex.generate_many([ids, ids], params, [pin["e2"], merge])
    assert got[0].token_ids == alone.token_ids, (got[0].text, alone.text)
    assert [k.split("@")[0] for k in ex.describe()["resident_experts"]] == ["e2", "e0", "e1"]


@pytest.mark.real
def test_a_forgotten_expert_leaves_the_reference_engine_at_the_next_planning(setup):
    from moerge.executors.reference import ReferenceExecutor
    pool, _, _, base = setup
    ex = ReferenceExecutor(base)
    params = SamplingParams(max_tokens=2)
    prompt = [{"role": "user", "content": "hi"}]
    ex.generate(prompt, params, _exec(pool, RoutingDecision("merge-linear", "static", chosen=["e0", "e1"])))
    assert [k.split("@")[0] for k in ex.describe()["resident_experts"]] == ["e0", "e1"]
    ex.forget("e0")
    ex.generate(prompt, params, _exec(pool, RoutingDecision("pinned", "sequence", chosen=["e2"])))
    assert [k.split("@")[0] for k in ex.describe()["resident_experts"]] == ["e1", "e2"]
    # an expert the next plan needs is kept, even if it was forgotten (it came back under the same name)
    ex.forget("e2")
    ex.generate(prompt, params, _exec(pool, RoutingDecision("pinned", "sequence", chosen=["e2"])))
    assert [k.split("@")[0] for k in ex.describe()["resident_experts"]] == ["e1", "e2"]


@pytest.mark.real
def test_a_pooled_plan_at_top_1_equals_each_modules_chosen_expert_merged(setup):
    """`joint` plans (gate_mode "pooled"): each module takes the expert its module bias ranks first among
    the experts that adapt it, for every token; at top-1 that is a merged model, module by module."""
    from moerge.experts.joint_gates import module_key
    pool, engine, adapters, base = setup
    keys = sorted({module_key(m) for ad in adapters.values() for m in ad.weights})
    g = torch.Generator().manual_seed(3)
    module_bias = {k: dict(zip(NAMES, torch.randn(3, generator=g).tolist())) for k in keys}
    d = RoutingDecision("joint", "token", chosen=list(NAMES), module_bias=module_bias,
                        gating={"gate_set": "", "mode": "pooled", "top_k": 1, "temperature": 1.0})
    plan = _row(engine, pool, d)
    ids = _ids(base)
    got = _logits_engine(engine, plan, ids)
    deltas, picked = {}, set()
    for m in {m for ad in adapters.values() for m in ad.weights}:
        order = sorted(NAMES, key=lambda n: -module_bias[module_key(m)][n])
        first = next(n for n in order if m in adapters[n].weights)
        deltas[m] = adapters[first].delta(m)
        picked.add(first)
    assert len(picked) > 1          # the draw makes modules disagree, or the test would prove little
    want = _merged_model(base, deltas)(input_ids=ids).logits
    assert torch.allclose(got, want, atol=2e-4), float((got - want).abs().max())
    # a module bias that prefers another expert at one module changes the output
    k0 = keys[0]
    flipped = {**module_bias, k0: {n: -v for n, v in module_bias[k0].items()}}
    other = _logits_engine(engine, _row(engine, pool, RoutingDecision(
        "joint", "token", chosen=list(NAMES), module_bias=flipped, gating=d.gating)), ids)
    assert (other - got).abs().max() > 1e-3


@pytest.mark.real
def test_a_pooled_plan_without_module_bias_is_refused(setup):
    from moerge.plan import PlanError
    pool, engine, adapters, base = setup
    d = RoutingDecision("joint", "token", chosen=list(NAMES),
                        gating={"gate_set": "", "mode": "pooled", "top_k": 2, "temperature": 1.0})
    with pytest.raises(PlanError, match="module bias"):
        make_plan(d, pool, Engines([EngineCaps("reference")]))
