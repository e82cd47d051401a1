"""Splitting a request into the instructions it asks for, and carrying an answer into the next step
(router/decompose.py): phrasings written here, none of them an evaluation template."""

from __future__ import annotations

import pytest

from moerge.router.decompose import (carry, first_prompt, is_instruction, neutral, refers_back, segments,
                                     split_payload)
from moerge.tasks import COMPOSED, get_task


def _texts(query: str) -> list[str]:
    return [s.text for s in segments(split_payload(query).instruction)]


@pytest.mark.parametrize("query, pieces", [
    ("Sort 4, 1, 3 and then give me the biggest one.", ["Sort 4, 1, 3", "give me the biggest one."]),
    ("Translate hello to French, then shout it.", ["Translate hello to French", "shout it."]),
    ("Double 21. After that, square the outcome.", ["Double 21.", "square the outcome."]),
    ("Capitalise 'good night moon', followed by reversing it", ["Capitalise 'good night moon'", "reversing it"]),
    ("To start, convert 2020-01-05 to US format; next, spell the month out.",
     ["convert 2020-01-05 to US format", "spell the month out."]),
    ("subtract 5 from 9 then multiply the difference by 3", ["subtract 5 from 9", "multiply the difference by 3"]),
    ("Firstly sum 2 and 3, afterwards halve the total", ["sum 2", "3", "halve the total"]),
    ("Sort 5, 2, 9. Next, take the first number.", ["Sort 5, 2, 9.", "take the first number."]),
])
def test_segments_cut_at_sequencing_connectives(query, pieces):
    assert _texts(query) == pieces


def test_a_sentence_that_starts_with_a_sequencing_word_is_a_strong_cut():
    assert [s.boundary for s in segments("Sort 5, 2, 9. Next, take the first number.")] == ["", "strong"]
    assert [s.boundary for s in segments("Sort 5, 2, 9. Take the first number.")] == ["", "weak"]


def test_nothing_inside_quotes_or_a_number_or_an_abbreviation_is_cut():
    assert _texts('Reverse "then we ate and slept" please') == ['Reverse "then we ate and slept" please']
    assert _texts("What is 3.5 km in U.S. miles?") == ["What is 3.5 km in U.S. miles?"]
    assert _texts("Convert to upper case: the cat and then the dog") == ["Convert to upper case"]


def test_payload_after_a_colon_or_before_a_blank_line_is_set_apart():
    p = split_payload("Reverse these words and then capitalise them: sun and moon")
    assert (p.instruction, p.payload, p.form) == ("Reverse these words and then capitalise them", "sun and moon",
                                                  "colon")
    p = split_payload("sun and moon\n\nReverse the words above, then capitalise them.")
    assert (p.payload, p.form) == ("sun and moon", "lead")
    # a short label is not an instruction part: "Task: ..." keeps its instruction
    assert split_payload("Task: add 2 and 3, then spell it").payload is None
    assert first_prompt("Reverse these words", split_payload("Reverse these words and upper-case them: a b")) == \
        "Reverse these words: a b"


@pytest.mark.parametrize("step, answer, prompt", [
    ("write the result in words", "555", "write in words: 555"),
    ("spell that number out", "12", "spell out: 12"),
    ("put it in capital letters.", "sat cat the", "put in capital letters: sat cat the"),
    ("make every letter of it uppercase", "Oslo", "make every letter uppercase: Oslo"),
    ("make every letter uppercase", "Paris", "make every letter uppercase: Paris"),
    ("now sort them from low to high", "9, 2, 5", "now sort from low to high: 9, 2, 5"),
    ("give the resulting list  backwards", "a b.", "give backwards: a b."),
])
def test_an_answer_is_carried_into_the_next_step(step, answer, prompt):
    assert carry(step, answer) == prompt


def test_references_back_instructions_and_neutral_routing_text():
    assert refers_back("express the total in words") and refers_back("shout it")
    assert not refers_back("convert to upper case")
    assert neutral("express the total in words") == "express this in words"
    assert neutral("spell the product out") == "spell this out"
    assert is_instruction("Calculate 17 + 4") and is_instruction("write it down")
    assert not is_instruction("367.") and not is_instruction("Numbers: 3, 1, 2") and not is_instruction("notation?")


def test_every_composed_task_prompt_splits_into_at_least_two_pieces_or_a_payload():
    """Every composed evaluation template offers a cut (whether a cut is kept is the router's call)."""
    for name in COMPOSED:
        for s in get_task(name).samples(5, 7, "eval"):
            assert len(_texts(s.prompt)) >= 2, s.prompt
