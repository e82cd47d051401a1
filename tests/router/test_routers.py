"""Sequence-level routers on a small pool with real card embeddings; calibration; live updates."""

from __future__ import annotations

import pytest

from moerge.experts.pool import ExpertPool
from moerge.router.base import make_router, method_names, query_text
from moerge.router.calibrate import best_threshold
from moerge.router.context import Calibration, RouterContext
from tests.helpers import make_lora

CARDS = {
    "adder": ("Adds two whole numbers and answers with their sum.", ["What is 12 + 30?", "Add 5 and 9."]),
    "shouter": ("Rewrites a sentence in upper case letters.", ["Uppercase this: hello there", "Make it all caps: hi"]),
    "capitals": ("Names the capital city of a country.", ["What is the capital of Peru?", "Capital of Japan?"]),
}


@pytest.fixture
def ctx(tmp_path, tiny_base, tiny_spec, embedder):
    pool = ExpertPool(tmp_path / "pool", f"sqlite:///{tmp_path}/r.sqlite", tiny_spec, embed=embedder.encode)
    ad = make_lora(tiny_base, tmp_path / "ad", base_name="tiny/llama")
    for name, (desc, ex) in CARDS.items():
        pool.register_lora(ad, name, desc, examples=ex, extra={"task": name})
    return RouterContext(pool, embedder.encode, calibration=Calibration({"embed": 0.3, "retrieval": 0.3}))


def test_every_method_of_the_design_is_registered():
    assert {"base", "oracle", "retrieval", "embed", "glider-global", "arrow", "phatgoose", "glider",
            "merge-linear", "merge-ties", "merge-cat"} <= set(method_names())


def test_the_method_table_holds_every_named_router_class_under_its_name():
    from moerge.router.base import Router
    from moerge.router.methods import METHODS

    def named(cls):
        for sub in cls.__subclasses__():
            yield from ([sub] if sub.name else []) + list(named(sub))
    assert all(METHODS[name].name == name for name in METHODS)
    assert {cls for cls in named(Router) if cls.__module__.startswith("moerge.router.")} == set(METHODS.values())


@pytest.mark.parametrize("method", ["embed", "retrieval"])
def test_sequence_router_ranks_the_right_expert_first(ctx, method):
    r = make_router(method, ctx)
    for query, want in [("Please add 345 and 12 for me", "adder"), ("Write HELLO WORLD in capitals: hello world",
                        "shouter"), ("Which city is the capital of Kenya?", "capitals")]:
        d = r.route(query)
        assert d.experts[0].name == want and d.chosen == [want] and not d.abstained
        assert [e.score for e in d.experts] == sorted((e.score for e in d.experts), reverse=True)


def test_out_of_domain_prompt_abstains(ctx):
    d = make_router("embed", ctx).route("Tell me a bedtime story about a dragon who loves tea.")
    assert d.abstained and d.chosen == []


def test_registered_expert_routes_at_once(ctx, tmp_path, tiny_base):
    ad = make_lora(tiny_base, tmp_path / "ad2", base_name="tiny/llama", seed=5)
    r = make_router("embed", ctx)
    q = "Translate this English sentence into French: good night"
    ctx.pool.register_lora(ad, "french", "Translates English sentences into French.",
                           examples=["Translate to French: thank you"])
    assert r.route(q).experts[0].name == "french"
    ctx.pool.remove("french")
    assert "french" not in [e.name for e in r.route(q).experts]


def test_oracle_and_base_and_merges(ctx):
    assert make_router("oracle", ctx).route("anything", task="capitals").chosen == ["capitals"]
    assert make_router("oracle", ctx).route("anything", task="unseen").abstained
    assert make_router("base", ctx).route("x").abstained
    d = make_router("merge-ties", ctx).route("x")
    assert d.granularity == "static" and sorted(d.chosen) == sorted(CARDS)


def test_token_level_decision_lists_eligible_experts(ctx):
    d = make_router("arrow", ctx).route("What is 3 + 4?")
    assert d.granularity == "token" and sorted(d.chosen) == sorted(CARDS)
    assert make_router("phatgoose", ctx).route("x").abstained  # no expert has a gate yet


def test_best_threshold_separates_and_balances():
    thr, acc = best_threshold([0.5, 0.6, 0.7], [0.1, 0.2, 0.3])
    assert 0.3 < thr < 0.5 and acc == 1.0
    thr, acc = best_threshold([0.5, 0.25], [0.3, 0.1])
    assert acc == 0.75


def test_query_text_uses_the_last_user_turn():
    msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "second"}]
    assert query_text(msgs) == "second"


def test_unknown_method_is_a_clear_error(ctx):
    from moerge.experts.errors import ExpertError
    with pytest.raises(ExpertError, match="unknown routing method"):
        make_router("magic", ctx)


def test_calibration_prompts_cover_both_shifts_of_training_data_and_never_evaluation_data():
    """In-domain calibration prompts of a task-backed expert: its training templates over the template lists
    and its paraphrase family over the training pool (new content, as users send it); an expert without a
    known task gives its stored examples."""
    from types import SimpleNamespace

    from moerge.router.calibrate import in_domain_prompts
    from moerge.tasks import get_task
    from moerge.tasks import content as C

    cards = [SimpleNamespace(extra={"task": "uppercase"}, examples=["unused"]),
             SimpleNamespace(extra={}, examples=["Say hi.", "Say bye."])]
    prompts = in_domain_prompts(SimpleNamespace(list=lambda: cards), per_expert=6)
    task = get_task("uppercase")
    template = [s.prompt for s in task.samples(6, 777, "train")]
    content = task.samples(6, 777, "train", "content")
    assert prompts == template + [s.prompt for s in content] + ["Say hi.", "Say bye."]
    assert all(C.pool_of(*key.split(":", 1)) == "train" for s in content for key in s.content)
    family = task.templates("train", "content")
    assert all(s.split == "train" and family[s.template] not in task.eval_templates for s in content)
