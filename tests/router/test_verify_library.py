"""`verify` on the real bundled library, through the service (`moerge:verify`): a near miss that
glider-global sends to the expert doing the inverse (lower-casing to `uppercase`, US→ISO dates to
`date_iso_to_us`) gets the base model's answer, with the expert's rejected answer in the routing record;
a request the expert does is answered by it. The prompts are phrased here, unlike any evaluation template,
over words and dates of no task's lists."""

from __future__ import annotations

import json

import httpx
import pytest

from moerge.router.verify import copies, shape_copies
from tests.router.test_chain_library import _chat

NEAR_MISSES = [   # (prompt, the expert doing the inverse, which glider-global picks for most of them)
    ("Please make this text lowercase: GOOD MORNING TO EVERY NEIGHBOUR", "uppercase"),
    ("Rewrite in small letters only: BLUE LANTERNS OVER THE HARBOUR", "uppercase"),
    ("Convert this to lower case letters: WINTER IS COMING SOON", "uppercase"),
    ("lowercase please: HAPPY BIRTHDAY MY FRIEND", "uppercase"),
    ("Can you write this in lowercase? THE RIVER IS COLD", "uppercase"),
    ("Give the ISO form (YYYY-MM-DD) of the US date 07/04/1998.", "date_iso_to_us"),
    ("Turn the American date 12/25/2031 into year-month-day.", "date_iso_to_us"),
    ("Express the US date 03/09/2044 in ISO 8601.", "date_iso_to_us"),
]
OWN_TASKS = [     # (prompt, its expert)
    ("Put this in capital letters: the quiet lantern glows", "uppercase"),
    ("Write the ISO date 2011-08-30 as month/day/year.", "date_iso_to_us"),
    ("Reverse the order of these words: sun moon harbour stars", "reverse_words"),
    ("What is 120 plus 45?", "arith_add"),
]

SENTIMENT = "Is this review positive or negative? The kettle broke on day one."


@pytest.fixture
def served(served_library):
    url, runtime = served_library
    # glider-global's instructions for this module's prompts, written in one batched engine call
    runtime.router_ctx.instruction_writer.prime([p for p, _ in NEAR_MISSES + OWN_TASKS] + [SENTIMENT])
    return url


def _reply(body) -> str:
    return body["choices"][0]["message"]["content"]


@pytest.mark.real
def test_a_near_miss_that_copies_the_request_is_answered_by_the_base_model(served):
    reached, rejected = [], []
    for prompt, inverse in NEAR_MISSES:
        plain = _chat(served, "moerge:glider-global", prompt)
        glider = plain["moerge"]
        body = _chat(served, "moerge:verify", prompt)
        check = body["moerge"]["detail"]["verify"]
        if not glider["chosen"]:                       # glider-global abstained: nothing to check
            assert check["status"] == "not run: no expert chosen" and body["moerge"]["abstain"]
            continue
        assert check["expert"] == glider["chosen"][0], (prompt, glider["chosen"], check)
        if check["expert"] != inverse:
            continue
        reached.append(prompt)
        assert check["checks"] == ["copy", "shape"]    # both run on uppercase and date_iso_to_us
        expert_answer = _reply(plain)                  # glider-global's reply is the expert's answer
        # the decision is the checks' verdict on what the expert says to this request
        assert (check["status"] == "rejected") == (copies(prompt, expert_answer) or shape_copies(prompt, expert_answer))
        if check["status"] == "rejected":
            assert check["expert_answer"] == expert_answer        # what the expert said, kept in the record
            assert _reply(body) == _reply(_chat(served, "base", prompt))
            assert body["moerge"]["chosen"] == [] and body["moerge"]["abstain"]
            assert body["moerge"]["plan"] == "base" and "plan_experts" not in body["moerge"]
            rejected.append(prompt)
        else:
            assert check["status"] == "passed" and _reply(body) == expert_answer
    # glider-global sends most of them to the inverse expert; the expert copies most of those back (measured:
    # 7 reached, 5 rejected; one it turns into other words, "WINTER" -> "WINDOW", passes)
    assert len(reached) >= 5 and len(rejected) >= 4, (reached, rejected)


@pytest.mark.real
def test_a_request_the_expert_does_passes_the_check_and_keeps_its_answer(served):
    for prompt, expert in OWN_TASKS:
        body = _chat(served, "moerge:verify", prompt)
        check = body["moerge"]["detail"]["verify"]
        assert check["status"] == "passed" and body["moerge"]["chosen"] == [expert], (prompt, check)
        assert _reply(body) == _reply(_chat(served, expert, prompt))


@pytest.mark.real
def test_a_check_the_experts_right_answers_fail_is_skipped(served):
    body = _chat(served, "moerge:verify", SENTIMENT)
    check = body["moerge"]["detail"]["verify"]
    assert check["expert"] == "sentiment" and "too often" in check["skipped"]["copy"]   # "positive" is offered
    assert check["checks"] == ["shape"] and check["status"] == "passed"
    assert body["moerge"]["chosen"] == ["sentiment"]


@pytest.mark.real
def test_a_streamed_verify_reply_is_checked_before_it_is_sent(served):
    prompt = NEAR_MISSES[4][0]
    chunks = []
    with httpx.stream("POST", f"{served}/v1/chat/completions", timeout=300,
                      json={"model": "moerge:verify", "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": 24, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == _reply(_chat(served, "moerge:verify", prompt))
    assert chunks[-1]["moerge"]["detail"]["verify"]["status"] == "rejected"
