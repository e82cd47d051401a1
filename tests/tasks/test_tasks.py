"""Every task renders, is deterministic, and its scorer accepts the answer and rejects a perturbation."""

from __future__ import annotations

import json
import re

import pytest

from moerge.tasks import HELD_IN, HELD_OUT, TASKS, get_task, normalise, out_of_domain_prompts
from moerge.tasks.vocab import COUNTRY_CAPITALS, number_to_words


def perturb(task, answer: str) -> str:
    if task.json_answer:
        d = json.loads(answer)
        d["age"] += 1
        return json.dumps(d)
    if re.fullmatch(r"\d+", answer):
        return str(int(answer) + 1)
    if task.name == "sentiment":
        return "negative" if answer == "positive" else "positive"
    if task.name in ("reverse_words",):
        words = answer.split()
        return " ".join(words[1:] + words[:1]) if len(set(words)) > 1 else answer + " x"
    return answer + "x"


def test_suite_shape():
    assert len(HELD_IN) == 12 and len(HELD_OUT) == 4
    for t in TASKS:
        assert len(t.eval_templates) >= 4
        if t.held_in:
            assert len(t.train_templates) >= 8
            assert not set(t.train_templates) & set(t.eval_templates)
    assert len(COUNTRY_CAPITALS) >= 60
    assert len(out_of_domain_prompts()) >= 60


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_every_template_renders_and_scores(task):
    for split, shift in ([("train", "template"), ("train", "content")] if task.held_in else []) + \
            [("eval", "template"), ("eval", "content")]:
        samples = task.samples(10 * len(task.templates(split, shift)), seed=3, split=split, shift=shift)
        used = {s.template for s in samples}
        n_templates = len(task.templates(split, shift))
        if split == "eval":       # evaluation templates cycle; training templates are drawn at random
            assert used == set(range(n_templates))
        else:
            assert used <= set(range(n_templates)) and len(used) >= 0.95 * n_templates
        for s in samples:
            assert not re.search(r"\{[a-z_ -]+\}", s.prompt), s.prompt   # every field was filled in
            assert task.score(s.answer, s.answer)
            assert task.score(s.answer + ".", s.answer)              # one trailing period is ignored
            assert task.score("  " + s.answer + " ", s.answer)       # whitespace is normalised
            bad = perturb(task, s.answer)
            assert bad != s.answer and not task.score(bad, s.answer), (task.name, s.answer, bad)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_samples_are_deterministic_by_seed(task):
    split = "train" if task.held_in else "eval"
    assert task.samples(10, 1, split) == task.samples(10, 1, split)
    assert task.samples(10, 1, split) != task.samples(10, 2, split)


def test_case_rules():
    assert get_task("capital_of").score("paris", "Paris")
    assert get_task("sentiment").score("Positive", "positive")
    assert not get_task("uppercase").score("the cat", "THE CAT")
    assert not get_task("reverse_words").score("Cat the", "cat the")


def test_json_person_compares_parsed_json():
    t = get_task("json_person")
    assert t.score('{"age": 31, "name": "Ana Kim"}', '{"name": "Ana Kim", "age": 31}')
    assert not t.score('{"name": "Ana Kim", "age": "31"}', '{"name": "Ana Kim", "age": 31}')
    assert not t.score("Ana Kim is 31", '{"name": "Ana Kim", "age": 31}')


def test_answers_are_correct_by_construction():
    for s in get_task("arith_add").samples(20, 0, "eval"):
        a, b = map(int, re.findall(r"\d+", s.prompt)[:2])
        assert int(s.answer) == a + b
    assert number_to_words(347) == "three hundred forty-seven"
    assert number_to_words(0) == "zero" and number_to_words(90) == "ninety" and number_to_words(100) == "one hundred"
    assert normalise(" a  b. ") == "a b" and normalise("a b..") == "a b."
