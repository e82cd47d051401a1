"""The content pools: training and the `content` evaluation shift never share an item, and every
generator is deterministic per (task, split, shift, seed)."""

from __future__ import annotations

import re

import pytest

from moerge.tasks import HELD_IN, TASKS, get_task
from moerge.tasks import content as C
from moerge.tasks.base import expand_paraphrases


def _keys(samples) -> set[str]:
    return {k for s in samples for k in s.content}


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_training_content_never_appears_in_the_evaluation_pool(task):
    evaluation = task.samples(400, 20261124, "eval", "content")
    eval_keys = _keys(evaluation)
    assert eval_keys and all(s.content for s in evaluation)
    for key in eval_keys:                       # every evaluation item is in the evaluation pool
        kind, item = key.split(":", 1)
        assert C.pool_of(kind, item) == "eval", key
    if not task.held_in:
        return
    train = task.samples(2000, 0, "train", "content")
    train_keys = _keys(train)
    assert train_keys and all(s.content for s in train)
    for key in train_keys:
        kind, item = key.split(":", 1)
        assert C.pool_of(kind, item) == "train", key
    assert not train_keys & eval_keys
    # and the texts themselves: no content word of an evaluation answer is in any training answer
    if task.name in ("uppercase", "reverse_words"):
        train_words = {w for s in train for w in C.content_words(s.answer.lower())}
        eval_words = {w for s in evaluation for w in C.content_words(s.answer.lower())}
        assert eval_words and not train_words & eval_words

def test_the_key_check_itself_can_fail():
    """A training sample built from an evaluation-pool word is caught by the pool check."""
    frequent, _ = C.words("eval")
    assert C.pool_of("word", frequent[0]) == "eval"
    assert C.pool_of("word", C.words("train")[0][0]) == "train"


def test_pools_are_broad_and_both_non_empty():
    frequent_train, rare_train = C.words("train")
    frequent_eval, rare_eval = C.words("eval")
    assert len(frequent_train) + len(rare_train) > 15000
    assert len(frequent_eval) + len(rare_eval) > 3000
    assert not (set(frequent_train) | set(rare_train)) & (set(frequent_eval) | set(rare_eval))
    for kind, items in (("country", C.COUNTRY_CAPITALS), ("first_name", C.FIRST_NAMES),
                        ("city", C.CITIES), ("product", C.PRODUCTS)):
        split = C.split_of(kind, items)
        assert split["train"] and split["eval"] and not set(split["train"]) & set(split["eval"])


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
@pytest.mark.parametrize("split,shift", [("train", "template"), ("train", "content"), ("eval", "template"),
                                         ("eval", "content")])
def test_generators_are_deterministic_per_task_split_shift_seed(task, split, shift):
    if split == "train" and not task.held_in:
        with pytest.raises(ValueError, match="held-out"):
            task.samples(3, 1, split, shift)
        return
    a = task.samples(12, 1, split, shift)
    assert a == task.samples(12, 1, split, shift)
    assert a != task.samples(12, 2, split, shift)
    assert all(s.shift == shift for s in a)


def test_the_two_shifts_draw_different_content():
    for name in HELD_IN:
        t = get_task(name)
        template = t.samples(50, 5, "eval", "template")
        content = t.samples(50, 5, "eval", "content")
        assert [s.prompt for s in template] != [s.prompt for s in content]
        assert [s.template for s in template] == [s.template for s in content]   # same templates


def test_content_shift_goes_beyond_the_template_shift_ranges():
    lengths = [len(s.prompt.split(": ", 1)[-1].split()) for s in get_task("count_words").samples(400, 0, "eval", "content")]
    assert max(lengths) > 12
    nums = [int(n) for s in get_task("arith_add").samples(400, 0, "eval", "content") for n in re.findall(r"\d+", s.prompt)]
    assert max(nums) > 999
    n2w = get_task("number_to_words").samples(200, 0, "eval", "content")
    assert any("thousand" in s.answer for s in n2w)


def test_unknown_shift_or_split_is_refused():
    t = get_task("uppercase")
    with pytest.raises(ValueError, match="unknown shift"):
        t.samples(2, 0, "eval", "vocabulary")
    with pytest.raises(ValueError, match="unknown split"):
        t.samples(2, 0, "dev")


def test_paraphrase_families_never_contain_an_evaluation_template():
    for t in TASKS:
        if not t.held_in:
            continue
        assert len(t.templates("train", "content")) >= 60 and t.templates("train") == t.train_templates
        assert not {x.lower() for x in t.templates("train", "content")} & {x.lower() for x in t.eval_templates}
    fam = expand_paraphrases(["convert {s} to upper case", "{s}\n\nUppercase the text above."])
    assert "Please convert {s} to upper case" in fam and "Convert {s} to upper case" in fam
    assert fam.count("{s}\n\nUppercase the text above.") == 1        # data-first phrases get no prefix


def test_the_first_recipe_is_unchanged():
    """Training samples of the template-lists recipe are those the committed library trained on."""
    s = get_task("uppercase").samples(2, 0, "train")
    assert s[0].shift == "template" and not s[0].content
    assert len(get_task("uppercase").templates("train")) == 8
