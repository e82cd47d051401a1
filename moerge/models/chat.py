"""The one place that turns chat messages into token ids for the base model (its chat
template), for generation and for training on prompt + answer."""

from __future__ import annotations

END_OF_TURN = "<|im_end|>"   # closes every turn in the base model's chat template


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` followed by the opening of the assistant's turn."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def encode_chat_answer(tokenizer, messages: list[dict], answer: str) -> tuple[list[int], int]:
    """(ids, prompt_len): `messages` with the assistant's turn holding `answer` and closed by
    END_OF_TURN; ids[:prompt_len] is exactly encode_chat(tokenizer, messages)."""
    prompt = encode_chat(tokenizer, messages)
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return prompt + list(answer_ids) + [tokenizer.convert_tokens_to_ids(END_OF_TURN)], len(prompt)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end an assistant turn: END_OF_TURN and the tokenizer's eos (if distinct)."""
    ids = [tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if isinstance(i, int) and i >= 0))
