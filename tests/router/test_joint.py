"""`joint`: gates trained jointly over the library, the request pooled per layer (issue 15, part 1)."""

from __future__ import annotations

import pytest
import torch

from moerge.eval.harness import EVAL_SEED
from moerge.experts.joint_gates import (
    JointGates, JointGatesError, _digest, current_joint, module_key, save_to_pool, train_joint_gates,
)
from moerge.models.generation import SamplingParams
from moerge.router.base import make_router
from moerge.tasks import HELD_IN, get_task


def test_module_keys_name_the_input_a_linear_reads():
    assert module_key("model.layers.3.self_attn.q_proj") == "3.attn"
    assert module_key("model.layers.3.self_attn.v_proj") == "3.attn"
    assert module_key("model.layers.12.self_attn.qkv_proj") == "12.attn"        # vLLM's packed name
    assert module_key("model.layers.0.mlp.gate_up_proj") == "0.mlp"
    assert module_key("model.layers.0.mlp.up_proj") == "0.mlp"
    assert module_key("model.layers.29.mlp.down_proj") == "29.down"
    assert module_key("model.layers.1.self_attn.o_proj") == "1.o"
    assert module_key("lm_head") is None and module_key("model.layers.1.input_layernorm") is None


def test_a_gate_set_round_trips_and_a_damaged_one_is_refused(tmp_path):
    g = {"0.attn": torch.randn(3, 8), "0.mlp": torch.randn(3, 8)}
    jg = JointGates(["a", "b", "c"], ["v1", "v2", "v3"], g, {"params": {"steps": 1}})
    jg.version = _digest(jg.experts, jg.versions, g)
    jg.save(tmp_path / "set")
    back = JointGates.load(tmp_path / "set")
    assert back.experts == jg.experts and back.version == jg.version and back.meta["params"] == {"steps": 1}
    assert all(torch.equal(back.gates[k], g[k]) for k in g)
    from safetensors.torch import save_file
    save_file({"0.attn": torch.full((3, 8), float("nan"))}, str(tmp_path / "set" / "gates.safetensors"))
    with pytest.raises(JointGatesError, match="damaged"):
        JointGates.load(tmp_path / "set")
    (tmp_path / "set" / "gates.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(JointGatesError, match="cannot be read"):
        JointGates.load(tmp_path / "set")


def test_pooled_logits_average_the_users_tokens_and_the_vote_is_a_distribution():
    g = {"0.attn": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    jg = JointGates(["a", "b"], ["", ""], g)
    x = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    pooled = jg.pooled_logits({"0.attn": x})
    assert torch.allclose(pooled["0.attn"], torch.tensor([1.0, 2.0]) / 2 ** 0.5)
    v = JointGates.vote(pooled)
    assert v.sum().item() == pytest.approx(1.0) and int(v.argmax()) == 1


@pytest.fixture(scope="module")
def library(real_settings, tmp_path_factory):
    from moerge.startup import start
    system = start(real_settings, executor="reference", pool_dir=tmp_path_factory.mktemp("jointpool"), bundled=True,
                   progress=lambda m: None)
    # a small set (4 training samples per task and recipe): enough to show the routing, in about a minute
    jg = train_joint_gates(system.pool, real_settings.base_model_dir, per_recipe=4, steps=100, dev_per_recipe=0)
    save_to_pool(system.pool, jg)
    yield system
    system.shutdown()


@pytest.mark.real
def test_joint_routing_sends_each_layer_of_a_held_in_request_to_its_expert(library):
    r = make_router("joint", library.router_ctx)
    assert current_joint(library.pool).experts == sorted(HELD_IN)
    own, layers_own, n = 0, 0.0, 0
    for shift in ("template", "content"):
        for t in HELD_IN:
            for s in get_task(t).samples(2, EVAL_SEED, "eval", shift):
                d = r.route(s.prompt)
                assert d.granularity == "token" and d.gating["mode"] == "pooled" and not d.abstained
                assert set(d.module_bias) == {f"{i}.{k}" for i in range(30) for k in ("attn", "o", "mlp", "down")}
                own += d.experts[0].name == t
                layers_own += sum(v == t for v in d.detail["layer_top"].values()) / 30
                n += 1
    # measured with this small set: first by the vote on 47/48, first at 91.8% of layers (chance: 1/12)
    assert own / n >= 0.8, own / n
    assert layers_own / n >= 0.6, layers_own / n


@pytest.mark.real
def test_joint_answers_held_in_requests_through_the_engine(library):
    """Per-layer routing answers like the pinned expert on most requests (phatgoose: 8% held-in)."""
    r = make_router("joint", library.router_ctx)
    samples = [get_task(t).samples(1, EVAL_SEED, "eval")[0] for t in HELD_IN]
    plans = [library.plan(r.route(s.prompt)) for s in samples]
    assert {p.kind for p in plans} == {"token_mixture"} and {p.gate_mode for p in plans} == {"pooled"}
    ex = library.local[0]
    ids = [library.encode([{"role": "user", "content": s.prompt}]) for s in samples]
    outs = ex.generate_many(ids, SamplingParams(max_tokens=24), plans)
    right = sum(get_task(s.task).score(o.text, s.answer) for s, o in zip(samples, outs))
    assert right >= 7, [(s.task, o.text) for s, o in zip(samples, outs)]
    assert all(o.layer_usage for o in outs)


@pytest.mark.real
def test_a_stale_set_routes_only_the_experts_it_was_trained_on(library):
    jg = current_joint(library.pool)
    versions = list(jg.versions)
    versions[0] = "0" * 64                      # as if experts[0] had been retrained since
    old = JointGates(jg.experts, versions, jg.gates, jg.meta)
    old.version = _digest(old.experts, versions, old.gates)
    save_to_pool(library.pool, old)
    try:
        r = make_router("joint", library.router_ctx)
        d = r.route("Convert to upper case: the cat sat on the mat")
        assert jg.experts[0] not in d.chosen and len(d.chosen) == len(jg.experts) - 1
        assert d.detail["stale"] == [f"{jg.experts[0]} changed or removed"]
    finally:
        save_to_pool(library.pool, jg)
