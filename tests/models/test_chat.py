"""One chat encoding: generation prompts and training examples share the same prompt ids."""

from __future__ import annotations

import pytest

from moerge.models.chat import END_OF_TURN, encode_chat, encode_chat_answer, stop_token_ids


@pytest.fixture(scope="module")
def tok(base_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(base_model_dir)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 345 + 210?"}]


@pytest.mark.real
def test_encode_chat_is_the_template_text_with_the_assistant_turn_open(tok):
    ids = encode_chat(tok, MESSAGES)
    text = tok.decode(ids)
    assert text == tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.rstrip().endswith("<|im_start|>assistant")


@pytest.mark.real
def test_encode_chat_answer_extends_the_prompt_and_closes_the_turn(tok):
    ids, prompt_len = encode_chat_answer(tok, MESSAGES, "555")
    assert ids[:prompt_len] == encode_chat(tok, MESSAGES)
    assert tok.decode(ids[prompt_len:]) == "555" + END_OF_TURN


@pytest.mark.real
def test_stop_token_ids_hold_the_end_of_turn(tok):
    assert tok.convert_tokens_to_ids(END_OF_TURN) in stop_token_ids(tok)
    assert len(set(stop_token_ids(tok))) == len(stop_token_ids(tok))
