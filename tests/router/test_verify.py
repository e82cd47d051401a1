"""`verify` (router/verify.py) without a model: what counts as a copy, which experts are checked, how a
decision is settled, and answered examples on cards (validated, atomic, from the bundled library)."""

from __future__ import annotations

import pytest

from moerge.experts.bundled import library_entries
from moerge.experts.card import AnsweredExample, ExpertCard
from moerge.router.base import ExpertScore, Router, RoutingDecision
from moerge.router.verify import VerifyRouter, copies, copy_rate, judge, pending, shape, shape_copies


@pytest.mark.parametrize("request_text, answer, expected", [
    ("Convert to lower case: THE DOG RAN FAST", "THE DOG RAN FAST", True),
    ("Convert to lower case: THE DOG RAN FAST", "  \"THE DOG  RAN FAST.\" ", True),   # quotes, spaces, stop
    ("Convert to lower case: THE DOG RAN FAST", "the dog ran fast", False),            # case-sensitive
    ("Put 03/15/2024 in ISO form.", "03/15/2024", True),
    ("Put 03/15/2024 in ISO form.", "2024-03-15", False),
    ("Add 0 and 4.", "4", False),                     # too short to say anything
    ("What is 11510 + 3?", "1151", False),            # only on word boundaries
    ("What is 1151 + 0?", "1151", True),
    ("Sort: 3, 9, 12", "3, 9, 12", True),
    ("Sort: 3, 9, 12", "...", False),
])
def test_copies(request_text, answer, expected):
    assert copies(request_text, answer) is expected


def test_shape_collapses_letter_and_digit_runs_and_keeps_punctuation():
    assert shape("12/25/2031") == "d/d/d" and shape("2031-12-25") == "d-d-d"
    assert shape("Hello, WORLD x1") == "Xx, X xd"


@pytest.mark.parametrize("request_text, answer, expected", [
    ("Turn the US date 12/25/2031 into ISO.", "08/25/2031", True),     # a US date again: the form of the data
    ("Turn the US date 12/25/2031 into ISO.", "2031-12-25", False),
    ("Write 2011-08-30 as month/day/year.", "08/30/2011", False),      # month/day/year is letters, not d/d/d
    ("Sort 3, 20, 18", "3, 18, 20", True),
    ("Spell out 108 in words.", "one hundred eight", False),            # plain words say nothing
    ("Add 417 and 734.", "1151", False),                                # a lone number says nothing
    ("Make loud: THE CAT", "THE DOG", False),                           # upper-case words say nothing
])
def test_shape_copies(request_text, answer, expected):
    assert shape_copies(request_text, answer) is expected


def _card(name, rows):
    return ExpertCard(name=name, kind="lora", base_model="m",
                      answered_examples=[AnsweredExample(prompt=p, answer=a) for p, a in rows])


def test_copy_rate_is_smoothed_over_the_answered_examples():
    assert copy_rate(_card("e", [])) == (0.5, 0)
    rows = [("Make loud: the cat", "THE CAT")] * 8 + [("Make loud: THE CAT", "THE CAT")] * 2
    assert copy_rate(_card("e", rows)) == pytest.approx(((2 + 1) / 12, 10))
    assert copy_rate(_card("e", rows), "shape") == pytest.approx((1 / 12, 10))


class _Fixed(Router):
    name, granularity = "fixed", "sequence"

    def __init__(self, chosen):
        self.chosen = chosen

    def route(self, query, *, task=None):
        return RoutingDecision("fixed", "sequence", experts=[ExpertScore(c, 0.9) for c in self.chosen],
                               chosen=list(self.chosen), abstained=not self.chosen)


class _Registry:
    def __init__(self, cards):
        self.cards = {c.name: c for c in cards}

    def get(self, name):
        return self.cards.get(name)


class _Ctx:
    def __init__(self, cards):
        self.pool = type("P", (), {"registry": _Registry(cards)})()


def _verify(cards, chosen):
    r = VerifyRouter()
    r.ctx, r.base = _Ctx(cards), _Fixed(chosen)
    return r


UPPER = [(f"Make loud: word{i} here", f"WORD{i} HERE") for i in range(10)]
LABELS = [(f"positive or negative? review {i}", "positive") for i in range(10)]


def test_a_checked_expert_is_pending_and_a_copy_is_rejected_into_an_abstention():
    r = _verify([_card("upper", UPPER)], ["upper"])
    d = r.route("Make quiet: THE CAT SAT")
    assert d.method == "verify" and pending(d) and d.chosen == ["upper"]
    assert judge(d, "Make quiet: THE CAT SAT", "THE CAT SAT") is True
    assert d.chosen == [] and d.abstained and not pending(d)
    assert d.detail["verify"]["status"] == "rejected" and d.detail["verify"]["expert_answer"] == "THE CAT SAT"


def test_a_transformed_answer_passes_and_keeps_the_expert():
    r = _verify([_card("upper", UPPER)], ["upper"])
    d = r.route("Make loud: the cat sat")
    assert judge(d, "Make loud: the cat sat", "THE CAT SAT") is False
    assert d.chosen == ["upper"] and not d.abstained and d.detail["verify"]["status"] == "passed"


DATES = [(f"Write {2000 + i}-01-0{i % 9 + 1} the US way.", f"01/0{i % 9 + 1}/{2000 + i}") for i in range(10)]


def test_a_near_miss_in_the_form_of_the_request_is_rejected_by_the_shape_check():
    r = _verify([_card("iso2us", DATES)], ["iso2us"])
    d = r.route("Turn the US date 12/25/2031 into ISO.")
    assert d.detail["verify"]["checks"] == ["copy", "shape"]
    assert judge(d, "Turn the US date 12/25/2031 into ISO.", "08/25/2031") is True
    assert d.detail["verify"]["failed"] == ["shape"] and d.chosen == []


@pytest.mark.parametrize("cards, chosen, why", [
    ([_card("upper", UPPER[:3])], ["upper"], "3 answered examples"),           # too few to know
    ([], ["gone"], "unknown expert"),
    ([_card("upper", UPPER)], [], "no expert chosen"),
])
def test_experts_that_cannot_be_checked_are_not_and_the_decision_says_why(cards, chosen, why):
    d = _verify(cards, chosen).route("anything")
    assert not pending(d)
    check = d.detail["verify"]
    assert why in (check["status"] + " " + " ".join(check.get("skipped", {}).values()))


def test_a_check_its_right_answers_fail_is_skipped_and_the_other_runs():
    d = _verify([_card("labels", LABELS)], ["labels"]).route("anything")
    check = d.detail["verify"]
    assert check["checks"] == ["shape"] and "too often" in check["skipped"]["copy"] and pending(d)
    assert judge(d, "positive or negative? it broke", "positive") is False    # a label: no form to copy


def test_the_bundled_library_checks_transformations_and_not_label_tasks():
    cards = {e["name"]: ExpertCard(name=e["name"], kind="lora", base_model="m",
                                   answered_examples=e["answered_examples"]) for e in library_entries()}
    r = _verify(list(cards.values()), [])
    checks = {n: r.checks_for(n)[0] for n in cards}
    assert all("copy" in checks[n] for n in ("uppercase", "date_iso_to_us", "reverse_words", "arith_add", "km_to_m"))
    assert "copy" not in checks["sentiment"]            # its prompts offer the label it answers with
    assert "shape" in checks["date_iso_to_us"] and "shape" not in checks["sort_numbers"]   # a sorted list keeps the form
    for e in library_entries():                 # answered examples are training samples, never evaluation ones
        from moerge.tasks import get_task
        t = get_task(e["task"])
        evals = {s.prompt for sh in ("template", "content") for s in t.samples(50, 20261124, "eval", sh)}
        assert not evals & {a["prompt"] for a in e["answered_examples"]}


def test_answered_examples_are_validated_and_a_bad_one_changes_nothing(tiny_pool, tiny_adapter):
    from moerge.experts.errors import ExpertError
    tiny_pool.register_lora(tiny_adapter, "loud", "upper-cases text",
                            answered_examples=[{"prompt": "Make loud: a b", "answer": "A B"}])
    assert [a.answer for a in tiny_pool.get("loud").answered_examples] == ["A B"]
    for bad in ([{"prompt": "x"}], [{"prompt": "", "answer": "y"}], ["just text"], [{"prompt": "p", "answer": 3}]):
        with pytest.raises(ExpertError, match="answered example 0"):
            tiny_pool.update("loud", answered_examples=bad)
        assert [a.answer for a in tiny_pool.get("loud").answered_examples] == ["A B"]
    with pytest.raises(ExpertError, match="answered example 0"):
        tiny_pool.register_lora(tiny_adapter, "loud2", answered_examples=[{"answer": "A"}])
    assert tiny_pool.names() == ["loud"]
    tiny_pool.update("loud", answered_examples=[{"prompt": "Make loud: c", "answer": "C"}] * 2)
    assert len(tiny_pool.get("loud").answered_examples) == 2


@pytest.mark.parametrize("wrapped", ["chain", "verify", "arrow"])
def test_verify_wraps_only_a_router_that_chooses_one_expert(wrapped):
    ctx = _Ctx([])
    with pytest.raises(ValueError, match="not such a router"):
        VerifyRouter(router=wrapped).fit(ctx)


def test_a_bundled_card_from_before_answered_examples_gets_them_and_a_changed_one_does_not(tiny_pool, tiny_adapter):
    from moerge.experts.bundled import _backfill
    rows = [{"prompt": "Make loud: a b", "answer": "A B"}]
    for name, examples in (("old", ["Make loud: x"]), ("edited", ["my own example"])):
        tiny_pool.register_lora(tiny_adapter, name, "upper-cases text", examples=examples, extra={"bundled": True})
    tiny_pool.register_lora(tiny_adapter, "mine", "upper-cases text", examples=["Make loud: x"])   # not bundled
    for name in ("old", "edited", "mine"):
        _backfill(tiny_pool, {"name": name, "examples": ["Make loud: x"], "answered_examples": rows})
    assert [a.answer for a in tiny_pool.get("old").answered_examples] == ["A B"]
    assert tiny_pool.get("old").examples == ["Make loud: x"]
    assert tiny_pool.get("edited").answered_examples == [] and tiny_pool.get("mine").answered_examples == []
