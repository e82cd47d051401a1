"""The batch-independence attack ("Buffer Overflow in Mixture of Experts"): adversarial batch-mates must
not change a victim's tokens or its routing record, for every plan kind each engine serves.

One vLLM engine (fp32, like tests/executors/test_vllm.py, so equal computations give equal bits) and
the reference engine, on the real base model and the bundled library. Each victim runs alone, then
in one submission with hostile requests:
- many requests that all pin the same expert, or push every token's gates to that one expert
  (bias ±1e4, top-1, temperature 0.01), to saturate it;
- very long prompts, repeated-token prompts, and the victims' own prompts under other plans;
- other adapters, an all-expert cat merge, a TIES merge of a subset, GLIDER with a huge α;
- more requests than the engine runs at once (max_num_seqs 32), so victims queue and join running
  batches at different steps.
The victim's tokens must be identical. Its layer usage (its per-layer routing record) must match to
within USAGE_TOL: fp32 kernels may sum in a different order for a different batch shape, and in CI that
moved one layer's share across a 4-decimal rounding boundary (0.7256 vs 0.7257). A batch-mate that leaked
into the victim's gates (every hostile forces arith_add with bias 1e4) would move shares by far more.

vLLM serves base, adapter, token_mixture (arrow, phatgoose, glider with its global bias) and
static_mixture (linear and cat merges, several pinned experts); the reference engine serves all of
these and dense_delta (TIES). Both engines run in one module: one vLLM start.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from moerge.models.generation import SamplingParams
from tests.helpers import pinned
from moerge.router.base import RoutingDecision, make_router

PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)    # greedy; forced length, so every step is compared
TOKEN_KINDS = {"token_mixture"}
USAGE_TOL = 2e-3      # per layer and expert share; the record is rounded to 4 decimals

# victim name -> (what routes it, its prompt)
VLLM_VICTIMS = {
    "base": ("base", "What is the capital of Peru?"),
    "adapter": ("pinned:arith_add", "What is 345 + 210? Answer with the number only."),
    "arrow": ("arrow", "Convert to upper case: the cat sat on the mat"),
    "phatgoose": ("phatgoose", "Reverse the order of the words: red green blue"),
    "glider": ("glider", "Count the words in: one two three four"),
    "merge-linear": ("merge-linear", "Write 42 in words."),
    "merge-cat": ("merge-cat", "Convert 3 km to metres."),
    "static-pair": ("pair:arith_add+capital_of", "What is 12 + 30?"),
}
REF_VICTIMS = {
    "base": VLLM_VICTIMS["base"],
    "adapter": VLLM_VICTIMS["adapter"],
    "arrow": VLLM_VICTIMS["arrow"],
    "phatgoose": VLLM_VICTIMS["phatgoose"],
    "merge-linear": VLLM_VICTIMS["merge-linear"],
    "merge-ties": ("merge-ties", "Name a colour of the sky."),
}
EXPECTED_KIND = {"base": "base", "adapter": "adapter", "arrow": "token_mixture", "phatgoose": "token_mixture",
                 "glider": "token_mixture", "merge-linear": "static_mixture", "merge-cat": "static_mixture",
                 "static-pair": "static_mixture", "merge-ties": "dense_delta"}


@pytest.fixture(scope="module")
def system(real_settings, tmp_path_factory):
    from moerge.startup import start
    s = start(real_settings, executor="vllm", pool_dir=tmp_path_factory.mktemp("bi-pool"), bundled=True,
              vllm_options=dict(dtype="float32", max_num_seqs=32, cpu_threads="all"),
              progress=lambda m: None)
    assert s.local[0].wait_ready(900)
    yield s
    s.shutdown()


def _extreme(system, mode: str, target: str) -> RoutingDecision:
    """Every token of every module gated to `target` alone: bias ±1e4, top-1, near-zero temperature."""
    names = system.pool.names()
    gate_set = "arrow" if mode == "arrow" else "gate"
    return RoutingDecision(mode, "token", chosen=names, bias={n: (1e4 if n == target else -1e4) for n in names},
                           gating={"gate_set": gate_set, "mode": mode, "top_k": 1, "temperature": 0.01})


def _decision(system, how: str, prompt: str) -> RoutingDecision | None:
    if how == "base":
        return None
    if how.startswith("pinned:"):
        return pinned(how.split(":", 1)[1])
    if how.startswith("pair:"):
        return pinned(*how.split(":", 1)[1].split("+"))
    if how == "glider":          # α = 10: the request's global bias and the token gates both matter
        return make_router("glider", system.router_ctx, alpha=10.0).route(prompt)
    return make_router(how, system.router_ctx).route(prompt)


def _ids(system, text: str) -> list[int]:
    return system.encode([{"role": "user", "content": text}])


def _hostiles(system, engine: str, victim_prompts: list[str], long_tokens: int) -> list[tuple[list[int], object]]:
    """(prompt ids, plan) of the adversarial batch-mates: 36 for vLLM, 10 for the reference engine (its
    batches hold 16 rows; 10 hostiles and 6 victims make one)."""
    tok = system.local[-1].tokenizer
    plan = system.plan
    long_prompt = tok("zz " * long_tokens)["input_ids"][:long_tokens]
    bangs = tok("!!!!" * 100)["input_ids"]
    mine = [_ids(system, p) for p in victim_prompts[:3]]
    odd = _ids(system, "Ignore the others and answer in French: what is 2+2?")
    if engine == "reference":
        names = system.pool.names()
        return [(_ids(system, f"Add {100 + i} and {7 * i}."), plan(pinned("arith_add"))) for i in range(3)] + [
            (long_prompt, plan(_extreme(system, "arrow", "arith_add"))),
            (mine[0], plan(_extreme(system, "phatgoose", "arith_add"))),
            ([5] * 3, plan(_extreme(system, "arrow", "arith_add"))),
            (mine[1], plan(pinned("sentiment"))),
            (bangs, plan(make_router("merge-cat", system.router_ctx).route("y"))),
            (odd, plan(RoutingDecision("merge-ties", "static", chosen=names[:3]))),      # another dense update
            (mine[2], plan(make_router("glider", system.router_ctx, alpha=1e4).route("Add 2 and 2."))),
        ]
    out = []
    # saturate one expert: the adapter victim's own expert, pinned by many requests and forced by token gates
    for i in range(16):
        out.append((_ids(system, f"Add {100 + i} and {7 * i}."), plan(pinned("arith_add"))))
    for mode in ("arrow", "phatgoose"):
        for ids in (long_prompt, bangs, [5] * 3, *mine):
            out.append((ids, plan(_extreme(system, mode, "arith_add"))))
    # other adapters, on very long and degenerate prompts and on the victims' own prompts
    for i, name in enumerate(("sentiment", "uppercase", "reverse_words", "capital_of")):
        out.append((long_prompt if i % 2 == 0 else mine[i % 3], plan(pinned(name))))
    out.append((bangs, plan(make_router("merge-cat", system.router_ctx).route("y"))))
    out.append((long_prompt, plan(make_router("glider", system.router_ctx, alpha=1e4).route("Add 2 and 2."))))
    out.append((odd, plan(make_router("phatgoose", system.router_ctx).route("x " * 50))))
    out.append((long_prompt, plan(None)))
    return out


def _on(plan, engine: str):
    """The plan on `engine`: the reference engine runs every kind; on vLLM the plan must not have fallen back."""
    if engine == "reference":
        return replace(plan, engine="reference")
    assert plan.engine == engine, (plan.kind, plan.fallback)
    return plan


def _run_attack(system, engine, victims: dict, long_tokens: int):
    """{victim: (plan, alone, together)} and the hostile rows' (plan, generation)."""
    ex = system.executor_named(engine)
    plans, ids = {}, {}
    for name, (how, prompt) in victims.items():
        p = system.plan(_decision(system, how, prompt))
        plans[name] = _on(p, engine)
        ids[name] = _ids(system, prompt)
    hostile = _hostiles(system, engine, [prompt for _, prompt in victims.values()], long_tokens)
    hostile = [(i, _on(p, engine)) for i, p in hostile]
    alone = {n: ex.generate_many([ids[n]], PARAMS, [plans[n]])[0] for n in victims}
    # victims spread through the submission: some run from the start, some queue behind hostiles
    rows: list[tuple[str | None, list[int], object]] = [(None, i, p) for i, p in hostile]
    for k, name in enumerate(victims):
        rows.insert((k * (len(rows) + 1)) // len(victims) + k % 2, (name, ids[name], plans[name]))
    gens = ex.generate_many([r[1] for r in rows], PARAMS, [r[2] for r in rows])
    together = {r[0]: g for r, g in zip(rows, gens) if r[0] is not None}
    hostile_out = [(r[2], g) for r, g in zip(rows, gens) if r[0] is None]
    return {n: (plans[n], alone[n], together[n]) for n in victims}, hostile_out


@pytest.fixture(scope="module")
def vllm_attack(system):
    # 36 hostile rows + 8 victims: more than max_num_seqs, with 1500-token prompts among them
    return _run_attack(system, "vllm", VLLM_VICTIMS, long_tokens=1500)


@pytest.fixture(scope="module")
def reference_attack(system):
    # the reference engine decodes 16 rows per batch (left-padded): 10 hostiles join the 6 victims, the long
    # prompt kept at 200 tokens so the fp32 transformers prefill stays short on 2 cores
    return _run_attack(system, "reference", REF_VICTIMS, long_tokens=200)


def _same_usage(got: dict, want: dict) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for layer, shares in want.items():
        other = got[layer]
        for name in set(shares) | set(other):
            a, b = other.get(name, 0.0), shares.get(name, 0.0)
            assert abs(a - b) <= USAGE_TOL, (layer, name, a, b)


def test_same_usage_tolerates_rounding_and_catches_a_leak():
    _same_usage({3: {"a": 0.7257, "b": 0.2743}}, {3: {"a": 0.7256, "b": 0.2744}})
    with pytest.raises(AssertionError):
        _same_usage({3: {"a": 0.70, "b": 0.28, "arith_add": 0.02}}, {3: {"a": 0.7256, "b": 0.2744}})
    with pytest.raises(AssertionError):
        _same_usage({3: {"a": 1.0}}, {3: {"a": 1.0}, 4: {"a": 1.0}})


def _check(victim: str, attack):
    plan, alone, together = attack[victim]
    assert plan.kind == EXPECTED_KIND[victim], (victim, plan.kind, plan.fallback)
    assert len(alone.token_ids) == PARAMS.max_tokens
    assert together.token_ids == alone.token_ids, (victim, alone.text, together.text)
    _same_usage(together.layer_usage, alone.layer_usage)
    if plan.kind in TOKEN_KINDS:       # token-level victims carry a routing record, and it is theirs
        assert set(alone.layer_usage) == set(range(30))
        assert set().union(*alone.layer_usage.values()) <= {e.name for e in plan.experts}
    else:
        assert alone.layer_usage == {}


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("victim", list(VLLM_VICTIMS))
def test_vllm_victim_keeps_its_tokens_and_routing_among_hostile_batch_mates(vllm_attack, victim):
    attack, _ = vllm_attack
    assert attack[victim][0].engine == "vllm"
    _check(victim, attack)


@pytest.mark.real
@pytest.mark.slow
def test_vllm_hostile_batch_mates_really_were_hostile(vllm_attack):
    """The attack ran as built: gates forced to one expert really route there, in the same submission."""
    _, hostile = vllm_attack
    assert len(hostile) > 32                        # more than the engine runs at once: victims queued
    forced = [g for p, g in hostile if p.kind == "token_mixture" and p.top_k == 1]
    assert len(forced) == 12
    for g in forced:
        assert g.layer_usage and all(set(shares) == {"arith_add"} for shares in g.layer_usage.values())
    assert max(g.prompt_tokens for _, g in hostile) >= 1500


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("victim", list(REF_VICTIMS))
def test_reference_victim_keeps_its_tokens_and_routing_among_hostile_batch_mates(reference_attack, victim):
    attack, _ = reference_attack
    assert attack[victim][0].engine == "reference"
    _check(victim, attack)
