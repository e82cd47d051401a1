"""The MoE engine's rerouting state (moerge/executors/vllm_moe.py) on stand-in layers, no vLLM: adapter
experts land in free physical rows, each layer's remap sends an adapter's tokens to its rows and every
other token to the base experts, the least recently used idle adapter is evicted when rows or slots run
out, a busy one never is, and what cannot fit is refused with the setting to raise."""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from moerge.executors.vllm_moe import MoeRerouting
from moerge.plan import ExpertRef

M, H, I, LAYERS = 4, 8, 16, 3


class FakeRunner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.routed_experts = torch.nn.Module()
        self.routed_experts.w13_weight = torch.nn.Parameter(torch.randn(M, 2 * I, H), requires_grad=False)
        self.routed_experts.w2_weight = torch.nn.Parameter(torch.randn(M, H, I), requires_grad=False)
        self.router = types.SimpleNamespace(custom_routing_function=None)


def fake_model():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList()
    for _ in range(LAYERS):
        layer = torch.nn.Module()
        layer.block_sparse_moe = torch.nn.Module()
        layer.block_sparse_moe.experts = FakeRunner()
        model.layers.append(layer)
    return model


def adapter(tmp_path, name: str, experts: dict[int, list[int]], seed: int) -> ExpertRef:
    folder = tmp_path / name
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, ids in experts.items():
        for e in ids:
            tensors[f"layers.{layer}.experts.{e}.w1.weight"] = torch.randn(I, H, generator=g)
            tensors[f"layers.{layer}.experts.{e}.w3.weight"] = torch.randn(I, H, generator=g)
            tensors[f"layers.{layer}.experts.{e}.w2.weight"] = torch.randn(H, I, generator=g)
    save_file(tensors, str(folder / "esft_model.safetensors"))
    (folder / "esft_config.json").write_text(json.dumps({"experts": {str(k): v for k, v in experts.items()}}))
    return ExpertRef(name, f"{name}-version-{seed:04d}" * 2, str(folder), 0)


def layer_weights(model, layer):
    ex = model.layers[layer].block_sparse_moe.experts.routed_experts
    return ex.w13_weight.data, ex.w2_weight.data


@pytest.fixture
def moe():
    state = MoeRerouting()
    model = fake_model()
    base = [tuple(t.clone() for t in layer_weights(model, i)) for i in range(LAYERS)]
    state.setup(model, rows=3, max_adapters=2)
    return state, model, base


def route(state, layer, rows, logits):
    state.token_rows = None if rows is None else torch.tensor(rows)
    return state.layers[layer].route(None, logits, 2, True)


def test_rows_are_allocated_as_adapters_need_them_and_the_base_experts_stay(moe, tmp_path):
    state, model, base = moe
    assert sorted(state.layers) == list(range(LAYERS))
    for i in range(LAYERS):
        w13, w2 = layer_weights(model, i)
        assert w13.shape[0] == w2.shape[0] == M                     # nothing allocated before an adapter comes
        assert model.layers[i].block_sparse_moe.experts.router.custom_routing_function == state.layers[i].route
    state.register_plan(1, adapter(tmp_path, "a", {0: [1, 2], 2: [3]}, seed=1))
    shapes = [layer_weights(model, i)[0].shape[0] for i in range(LAYERS)]
    assert shapes == [M + 2, M, M + 2]                               # 2 rows at least per growth, only where used
    for i in range(LAYERS):
        w13, w2 = layer_weights(model, i)
        assert torch.equal(w13[:M], base[i][0]) and torch.equal(w2[:M], base[i][1])
    state.register_plan(2, adapter(tmp_path, "b", {0: [0]}, seed=2))
    assert layer_weights(model, 0)[0].shape[0] == M + 3              # capped at the engine's `rows`
    assert state.describe()["allocated_rows"] == {0: 3, 1: 0, 2: 2}


def test_an_adapters_tokens_reach_its_rows_and_other_tokens_the_base(moe, tmp_path):
    state, model, _ = moe
    ref = adapter(tmp_path, "a", {0: [1, 2], 2: [3]}, seed=1)
    state.register_plan(11, ref)
    state.begin_batch([0, 11, 11, 99])            # base, adapter, adapter, some other LoRA id
    rows = state.token_rows.tolist()
    assert rows[0] == 0 and rows[3] == 0 and rows[1] == rows[2] != 0
    logits = torch.tensor([[0.0, 5.0, 4.0, -9.0]] * 4)                    # top-2: experts 1 and 2
    w, ids = state.layers[0].route(None, logits, 2, True)
    phys = state.resident[ref.key].rows[0]
    assert sorted(ids[0].tolist()) == [1, 2] and sorted(ids[3].tolist()) == [1, 2]
    assert sorted(ids[1].tolist()) == sorted([phys[1], phys[2]]) and min(phys.values()) >= M
    w13, w2 = layer_weights(model, 0)
    tensors = load_file(f"{ref.adapter_dir}/esft_model.safetensors")
    assert torch.equal(w13[phys[1], :I], tensors["layers.0.experts.1.w1.weight"])
    assert torch.equal(w13[phys[1], I:], tensors["layers.0.experts.1.w3.weight"])
    assert torch.equal(w2[phys[1]], tensors["layers.0.experts.1.w2.weight"])
    # layer 1: the adapter replaces nothing, its tokens stay on the base experts
    _, ids1 = state.layers[1].route(None, logits, 2, True)
    assert sorted(ids1[1].tolist()) == [1, 2]
    # the weights are the bare router's whatever the rows
    w_base, _ = route(state, 0, None, logits)
    assert torch.allclose(w, w_base)


def test_the_least_recently_used_idle_adapter_is_evicted_and_a_busy_one_never(moe, tmp_path):
    state, _, _ = moe
    a = adapter(tmp_path, "a", {0: [1, 2]}, seed=1)
    b = adapter(tmp_path, "b", {0: [3]}, seed=2)
    c = adapter(tmp_path, "c", {0: [0, 1]}, seed=3)
    state.register_plan(1, a)
    state.register_plan(2, b)
    state.drop_plan(1)                    # a idle, b busy; layer 0 has 0 free rows left, c needs 2
    state.register_plan(3, c)
    assert set(state.resident) == {b.key, c.key} and state.evictions == 1
    assert state.layers[0].remap[state.resident[b.key].slot + 1, 3] >= M    # b untouched
    # every row busy: a cannot come back while b and c run
    with pytest.raises(RuntimeError, match="used by running requests"):
        state.register_plan(4, a)
    state.drop_plan(2)
    with pytest.raises(RuntimeError, match="used by running requests"):
        state.register_plan(4, a)             # b goes idle, but its one row is not enough beside busy c
    assert set(state.resident) == {b.key, c.key}     # refused before evicting anything
    state.drop_plan(3)
    state.register_plan(4, a)
    assert set(state.resident) == {a.key} and state.evictions == 3
    layer0 = state.layers[0]
    assert len(layer0.free) == 1
    slot = state.resident[a.key].slot
    other = 1 - slot
    assert layer0.remap[other + 1].tolist() == list(range(M))      # evicted slots are the identity again
    assert sorted(layer0.remap[slot + 1, [1, 2]].tolist()) == sorted(state.resident[a.key].rows[0].values())


def test_too_many_experts_in_one_layer_is_refused_with_the_setting_to_raise(moe, tmp_path):
    state, _, _ = moe
    big = adapter(tmp_path, "big", {0: [0, 1, 2, 3]}, seed=4)
    with pytest.raises(RuntimeError, match="moe_adapter_rows"):
        state.register_plan(1, big)
    assert not state.resident and all(layer.allocated == 0 and not layer.free for layer in state.layers.values())


def test_forget_evicts_an_idle_removed_adapter(moe, tmp_path):
    state, _, _ = moe
    a = adapter(tmp_path, "a", {1: [2]}, seed=1)
    state.register_plan(1, a)
    assert state.forget([], "a") == []            # still running
    assert state.forget([1], "a") == [a.key]
    assert not state.resident and state.layers[1].remap[1:].tolist() == [list(range(M))] * 2


def test_moe_plans_go_only_to_the_moe_engine_and_wait_for_it_with_a_503():
    from moerge.plan import EngineCaps, Engines, EngineStartingError, PlanError, make_plan
    from moerge.router.moe_method import MoeRouter
    decision = MoeRouter.__new__(MoeRouter).route("anything")
    dense, ref = EngineCaps("vllm", kinds=frozenset({"base", "adapter"})), EngineCaps("reference")
    moe_kinds = frozenset({"moe", "esft"})
    plan = make_plan(decision, None, Engines([dense, EngineCaps("vllm-moe", kinds=moe_kinds), ref]))
    assert (plan.kind, plan.engine) == ("moe", "vllm-moe")
    with pytest.raises(EngineStartingError) as starting:
        make_plan(decision, None, Engines([dense, EngineCaps("vllm-moe", ready=False, kinds=moe_kinds), ref]))
    assert starting.value.status == 503
    with pytest.raises(PlanError) as missing:          # no MoE engine at all: the client's request is wrong
        make_plan(decision, None, Engines([dense, ref]))
    assert missing.value.status == 400 and "moe" in missing.value.message


def test_the_moe_engine_admits_no_more_distinct_adapters_than_it_has_slots(tmp_path, monkeypatch):
    import asyncio

    from moerge.executors import vllm_engine
    from moerge.plan import ExecutionPlan, PlanError
    live: dict[str, int] = {}
    most = []

    async def fake_generate(self, prompt_ids, sp, plan, out_q):
        key = plan.experts[0].key if plan.experts else "moe"
        live[key] = live.get(key, 0) + 1
        most.append(len([k for k in live if k != "moe"]))
        await asyncio.sleep(0.05)
        live[key] -= 1
        if not live[key]:
            del live[key]
        return key, {}

    monkeypatch.setattr(vllm_engine.VllmExecutor, "_agenerate", fake_generate)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    ex = vllm_engine.VllmMoeExecutor(tmp_path / "model", adapter_rows=2, max_adapters=2, start=False)
    refs = [adapter(tmp_path, n, {0: [1]}, seed=i) for i, n in enumerate("abc")]
    plans = [ExecutionPlan("esft", (r,)) for r in refs for _ in range(3)] + [ExecutionPlan("moe")] * 3

    async def run():
        return await asyncio.gather(*[ex._agenerate([1], None, p, None) for p in plans])

    done = asyncio.run(run())
    assert len(done) == 12 and max(most) == 2          # 3 adapters, 2 slots: the third waited
    wide = ExecutionPlan("esft", (adapter(tmp_path, "wide", {0: [0, 1, 2]}, seed=9),))
    with pytest.raises(PlanError, match="moe_adapter_rows"):
        asyncio.run(ex._agenerate([1], None, wide, None))
