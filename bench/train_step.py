"""LoRA training step time: the model's own causal-LM loss against `answer_loss` (moerge/experts/training.py),
side by side in one run: the same base model, rank-4 adapter on every linear layer, batches of 16
content-pools-v1 training samples, bf16 autocast where the CPU has it.

python -m bench.train_step [--task arith_mul] [--steps 6]   (the first step of each is not counted)
"""
from __future__ import annotations

import argparse
import time

import torch


def run(task: str = "arith_mul", steps: int = 6, batch: int = 16) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from moerge.assets import ensure_base_model
    from moerge.config import get_settings
    from moerge.experts.training import ALL_LINEAR, answer_loss, collate, encode_example, load_tokenizer, train_step
    from moerge.tasks import get_task

    base = ensure_base_model(get_settings())
    tok = load_tokenizer(base)
    rows = [encode_example(tok, s.prompt, s.answer) for s in get_task(task).samples(batch * steps, 0, "train", "content")]
    out = {}
    for name, loss_fn in (("model_loss", None), ("answer_loss", answer_loss)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model.config.use_cache = False
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL_LINEAR), task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-3)
        model.train()
        times = []
        for i in range(steps):
            b = collate(rows[i * batch:(i + 1) * batch], tok.pad_token_id)
            t0 = time.perf_counter()
            train_step(model, b, opt, params, 2e-3, loss_fn)
            times.append(time.perf_counter() - t0)
        out[name] = round(sum(times[1:]) / max(1, len(times) - 1), 3)
        print(f"{name}: {out[name]} s/step", flush=True)
    out["speedup"] = round(out["model_loss"] / out["answer_loss"], 2)
    print(f"answer_loss is {out['speedup']}x faster ({task}, {batch} rows a step)")
    return {"task": task, "batch": batch, **out}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="arith_mul")
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    run(a.task, a.steps)
