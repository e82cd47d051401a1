"""InstructionWriter.prime: many instructions in one engine call, the same texts `write` gives."""

from __future__ import annotations

from moerge.router.instruction import InstructionWriter


def _fake_complete(messages, max_tokens):
    return f"Do: {messages[-1]['content']}\nextra line"


def test_prime_writes_each_uncached_query_once_in_one_call_and_write_then_hits():
    calls = []

    def many(conversations, max_tokens):
        calls.append(len(conversations))
        return [_fake_complete(m, max_tokens) for m in conversations]

    w = InstructionWriter(_fake_complete, complete_many=many)
    single = InstructionWriter(_fake_complete)
    assert w.write("Add 2 and 3") == single.write("Add 2 and 3")
    assert w.prime(["Add 2 and 3", "Sort 3, 1", "sort  3, 1", "Upper: a"]) == 2   # cached, and a repeat
    assert calls == [2]
    for q in ("Sort 3, 1", "Upper: a"):
        assert w.write(q) == (single.write(q)[0], True)              # first line, as write gives it
    assert w.prime(["Upper: a"]) == 0 and calls == [2]


def test_prime_without_a_batched_engine_writes_one_at_a_time():
    w = InstructionWriter(_fake_complete)
    assert w.prime(["a b", "c d"]) == 2 and w.write("c d") == ("Do: Request: c d", True)
