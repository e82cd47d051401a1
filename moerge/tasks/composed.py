"""Composed held-out tasks (docs/TASKS.md): each needs two held-in skills in sequence, the second
applied to the first one's answer. No expert is trained for them; answering them well means
chaining two experts.

Each task's instance is built from the first skill's generator (so the same template lists and
content pools, and the content shift keeps its meaning), and its answer is the second skill
applied to the first skill's answer.
"""

from __future__ import annotations

import random

from moerge.tasks import suite as S
from moerge.tasks import vocab as V
from moerge.tasks.base import Task


def _upper(text: str) -> str:
    return text.upper()


def _words(number: str) -> str:
    return V.number_to_words(int(number))


def _compose(first, second, *, fits=lambda answer: True, tries: int = 200):
    """A maker for `second(first(x))`: `first` is a suite maker (fields, answer[, keys]); instances whose
    first answer the second skill cannot take (`fits` false) are drawn again, deterministically."""
    def make(rng: random.Random, *pool):
        for _ in range(tries):
            out = first(rng, *pool)
            if fits(out[1]):
                return (out[0], second(out[1]), *out[2:])
        raise RuntimeError(f"{first.__name__}: no instance in {tries} draws fits the second step")
    return make


def _in_words_range(answer: str) -> bool:
    return 0 <= int(answer) <= 9999


COMPOSED_TASKS: list[Task] = [
    Task("reverse_then_upper", False, "Reverses the order of the words in a sentence, then writes the result "
         "in upper case.", _compose(S.make_reverse, _upper), [],
         ["Reverse the order of the words in \"{s}\", then convert the result to upper case.",
          "First flip the word order of this sentence, and then write it in capital letters: {s}",
          "Take the sentence \"{s}\" and put its words in reverse order. After that, make every letter uppercase.",
          "Please reverse the words of the following text and capitalize every letter of the output: {s}",
          "Write the words of \"{s}\" from last to first, followed by converting them to all caps."],
         tags=["composed", "text"]),
    Task("add_then_words", False, "Adds two whole numbers, then writes the sum in English words.",
         _compose(S.make_add, _words, fits=_in_words_range), [],
         ["Add {a} and {b}, then write the result in words.",
          "First compute {a} + {b}. Then spell out the answer in English words.",
          "What is {a} plus {b}? After that, express the total in words.",
          "Work out the sum of {a} and {b} and then write that number using words.",
          "Calculate {a} + {b}; write the sum out in letters."], case_insensitive=True,
         tags=["composed", "math", "numbers"]),
    Task("mul_then_words", False, "Multiplies a number by a single digit, then writes the product in English "
         "words.", _compose(S.make_mul, _words, fits=_in_words_range), [],
         ["Multiply {a} by {b}, then write the result in words.",
          "First work out {a} times {b}. Next, spell the product out in English words.",
          "Compute the product of {a} and {b} and then give that number written in words.",
          "What is {a} x {b}? Then express the answer using words.",
          "Find {b} times {a}, followed by writing the outcome in letters."], case_insensitive=True,
         tags=["composed", "math", "numbers"]),
    Task("count_then_words", False, "Counts the words in a sentence, then writes the count in English words.",
         _compose(S.make_count, _words), [],
         ["Count the words in \"{s}\", then write the number in words.",
          "First tell me how many words this sentence has, and then spell that number out: {s}",
          "How many words are in the following text? After that, write the count in English words. {s}",
          "Determine the number of words in \"{s}\" and then express the result in letters.",
          "Work out the word count of this line; then give it as English words: {s}"], case_insensitive=True,
         tags=["composed", "text", "counting"]),
    Task("capital_then_upper", False, "Names the capital city of a country, then writes it in upper case.",
         _compose(S.make_capital, _upper), [],
         ["Name the capital of {c}, then write the result in upper case.",
          "First tell me the capital city of {c}. Then convert that name to all capital letters.",
          "What is the capital of {c}? After that, rewrite the answer in uppercase.",
          "Give the capital city of {c} and then put it in all caps.",
          "Find the capital of {c}, followed by making every letter of it uppercase."],
         tags=["composed", "geography", "case"]),
]

COMPOSED_CONTENT = {
    "reverse_then_upper": _compose(S.c_reverse, _upper),
    "add_then_words": _compose(S.c_add, _words, fits=_in_words_range),
    "mul_then_words": _compose(S.c_mul, _words, fits=_in_words_range),
    "count_then_words": _compose(S.c_count, _words),
    "capital_then_upper": _compose(S.c_capital, _upper),
}
# which held-in skills each composes, in order (the chain an ideal router would build)
COMPOSED_STEPS = {
    "reverse_then_upper": ("reverse_words", "uppercase"),
    "add_then_words": ("arith_add", "number_to_words"),
    "mul_then_words": ("arith_mul", "number_to_words"),
    "count_then_words": ("count_words", "number_to_words"),
    "capital_then_upper": ("capital_of", "uppercase"),
}
for _t in COMPOSED_TASKS:
    _t.make_content = COMPOSED_CONTENT[_t.name]
