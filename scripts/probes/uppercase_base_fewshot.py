"""Does the base model know how to upper-case words it was never shown? Six-shot prompting of
SmolLM2-135M-Instruct (fp32, greedy) on content from the *evaluation* pool (a probe of the base model,
not a choice of anything): 40 texts of 2-10 words, 40 single words, 40 frequent and 40 rare words.

    .venv/bin/python scripts/probes/uppercase_base_fewshot.py     # about 12 min on 2 cores

Measured 2026-12-07: texts 0.0, single words 42.5, frequent words 45.0, rare words 32.5 (% exact).
"""
import random

import torch
from transformers import AutoTokenizer, AutoModelForCausalLM
from moerge.assets import ensure_base_model
from moerge.config import get_settings
from moerge.tasks import content as C

torch.set_num_threads(2)
p = ensure_base_model(get_settings())
tok=AutoTokenizer.from_pretrained(p); m=AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
rng=random.Random(5)
shots=[C.text(rng,"train",2,6) for _ in range(6)]
pre="".join(f"Text: {s}\nUPPER: {s.upper()}\n\n" for s in shots)
def run(items):
    ok=0
    for s in items:
        ids=tok(pre+f"Text: {s}\nUPPER:",return_tensors="pt").input_ids
        out=m.generate(ids,max_new_tokens=60,do_sample=False)
        got=tok.decode(out[0,ids.shape[1]:],skip_special_tokens=True).split("\n")[0].strip()
        ok+= got==s.upper()
    return ok/len(items), got
rng=random.Random(9)
print("eval pool texts", run([C.text(rng,"eval",2,10) for _ in range(40)]))
print("eval single words", run([C.word(rng,"eval") for _ in range(40)]))
fr,ra=C.words("eval")
print("eval frequent words", run([rng.choice(fr) for _ in range(40)]))
print("eval rare words", run([rng.choice(ra) for _ in range(40)]))
