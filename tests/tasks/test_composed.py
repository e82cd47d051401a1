"""The composed held-out tasks (tasks/composed.py): each answer is the second skill applied to the first
skill's answer, on both shifts, and they stay out of the held-in and held-out groups."""

from __future__ import annotations

import pytest

from moerge.tasks import COMPOSED, COMPOSED_STEPS, HELD_IN, HELD_OUT, get_task


def test_composed_tasks_are_their_own_group_of_held_in_skills():
    assert len(COMPOSED) >= 4
    assert not set(COMPOSED) & set(HELD_IN + HELD_OUT)
    for name in COMPOSED:
        task = get_task(name)
        assert not task.held_in and not task.train_templates and len(task.eval_templates) >= 4
        first, second = COMPOSED_STEPS[name]
        assert first in HELD_IN and second in HELD_IN and first != second


@pytest.mark.parametrize("name", COMPOSED)
@pytest.mark.parametrize("shift", ["template", "content"])
def test_answer_is_the_second_skill_of_the_first_skills_answer(name, shift):
    """Answers have the second skill's form (upper case, or English number words) and the exact scorer
    accepts them and nothing longer; the content shift records its content keys."""
    first, second = (get_task(t) for t in COMPOSED_STEPS[name])
    samples = get_task(name).samples(12, 3, "eval", shift)
    assert samples == get_task(name).samples(12, 3, "eval", shift)          # deterministic
    for s in samples:
        if second.name == "uppercase":
            assert s.answer == s.answer.upper() and any(c.isalpha() for c in s.answer)
        else:
            assert second.name == "number_to_words" and s.answer.replace("-", " ").replace(" ", "").isalpha()
        assert get_task(name).score(s.answer + ".", s.answer)
        assert not get_task(name).score(s.answer + " extra", s.answer)
    if shift == "content":
        assert all(s.content for s in samples)


def test_reverse_then_upper_example():
    s = get_task("reverse_then_upper").samples(1, 0, "eval")[0]
    words = s.prompt.split('"')[1].split()
    assert s.answer == " ".join(reversed(words)).upper()
