"""Can the base model upper-case unseen words if it writes the answer one character per token?

An upper-case answer in the tokenizer's own pieces ("MAR" "KET") needs the model to know, for every
lower-case token, which upper-case pieces spell it; written one character per token (byte-level BPE
has a token for every single character, and they decode back to the same text) it needs only the
word's letters. Six-shot prompting of SmolLM2-135M-Instruct (fp32, greedy) on content from the
*training* pool (this probe informs a training choice, so it does not read the evaluation pool), the
same shots and items in both forms:

    .venv/bin/python scripts/probes/uppercase_chars.py      # a few minutes on 2 cores

Prints the exact-match share of single words and of texts of 2-6 words, in each form.

Measured 2026-12-08 (11m18s): tokenizer pieces: single words 12.5%, texts 0.0%; one character per token:
single words 0.0%, texts 0.0%. (The pieces form here tokenizes the answer apart from the space before it,
unlike uppercase_base_fewshot.py's natural text, which got 42.5% on single words.) No sign that writing one
character per token makes the skill easier for this model, so no expert was trained that way.
"""
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moerge.assets import ensure_base_model
from moerge.config import get_settings
from moerge.tasks import content as C

torch.set_num_threads(2)
path = ensure_base_model(get_settings())
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def pieces(text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def chars(text: str) -> list[int]:
    """One token per character (each character tokenized alone: a space is its own token)."""
    out = []
    for ch in text:
        ids = pieces(ch)
        assert len(ids) == 1, (ch, ids)
        out += ids
    return out


NL = pieces("\n")


def run(items: list[str], shots: list[str], form) -> float:
    prefix = []
    for s in shots:
        prefix += pieces(f"Text: {s}\nUPPER:") + pieces(" ") + form(s.upper()) + NL + NL
    ok = 0
    for s in items:
        ids = torch.tensor([prefix + pieces(f"Text: {s}\nUPPER:") + pieces(" ")])
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=4 * len(s) + 8, do_sample=False, pad_token_id=tok.eos_token_id)
        got = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip()
        ok += got == s.upper()
    return ok / len(items)


rng = random.Random(5)
shots = [C.text(rng, "train", 2, 6) for _ in range(6)]
rng = random.Random(11)
words = [C.word(rng, "train") for _ in range(40)]
texts = [C.text(rng, "train", 2, 6) for _ in range(30)]
for name, form in (("tokenizer pieces", pieces), ("one character per token", chars)):
    print(f"{name}: single words {100 * run(words, shots, form):.1f}%, texts {100 * run(texts, shots, form):.1f}%",
          flush=True)
