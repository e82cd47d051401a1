"""Choose between a library expert and a retrained candidate on development sets only.

`moerge experts choose --candidates DIR [--install]`. For each task with a candidate in DIR, both
adapters answer the same development prompts: training templates over training content, from both
recipes (template-lists-v0 over the template lists, content-pools-v1 over the training pool), with a
seed no training run or early stop uses. Evaluation templates and the evaluation pool are never
read. The candidate replaces the incumbent when its mean over the two development sets is higher by
at least `margin`; the decision, with both experts' figures, goes into the candidate's manifest as
`selection`, and into the library's manifest when it is installed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from moerge.experts.training import RECIPES, accuracy, load_tokenizer
from moerge.tasks import get_task

SELECT_SEED = 2_000_003     # training runs draw data_seed (0) and dev data_seed + 1_000_003
N_DEV = 48
FILES = ("adapter_config.json", "adapter_model.safetensors", "gate.safetensors", "manifest.json")


def dev_accuracy(base_dir: Path, adapter_dir: Path, task: str, n: int = N_DEV) -> dict[str, float]:
    """{recipe: accuracy} of one adapter on the development sets of both recipes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      adapter_dir).eval()
    out = {}
    for recipe, shift in RECIPES.items():
        samples = get_task(task).samples(n, SELECT_SEED, "train", shift)
        width = max(len(tok(s.answer)["input_ids"]) for s in samples) + 6
        out[recipe] = round(accuracy(task, model, tok, samples, width)[0], 4)
    return out


def choose(base_dir: Path, library: Path, candidates: Path, *, install: bool = False, margin: float = 0.02,
           n: int = N_DEV, log=print) -> list[dict]:
    """One decision per task folder in `candidates` that has a finished expert."""
    decisions = []
    for folder in sorted(p for p in candidates.iterdir() if (p / "gate.safetensors").exists()):
        task = folder.name
        get_task(task)
        if not (library / task / "manifest.json").exists():
            raise ValueError(f"{task}: the library has no such expert to compare with")
        inc, cand = dev_accuracy(base_dir, library / task, task, n), dev_accuracy(base_dir, folder, task, n)
        mean = lambda d: sum(d.values()) / len(d)      # noqa: E731
        take = mean(cand) >= mean(inc) + margin
        d = {"task": task, "incumbent_dev": inc, "candidate_dev": cand, "margin": margin, "replace": take,
             "dev": {"seed": SELECT_SEED, "n": n, "split": "train", "recipes": list(RECIPES)}}
        log(f"{task}: incumbent dev {inc}, candidate dev {cand} -> {'replace' if take else 'keep'}")
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["selection"] = d
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if take and install:
            staged = library / f".{task}.new"
            shutil.rmtree(staged, ignore_errors=True)
            staged.mkdir()
            for f in FILES:
                shutil.copy2(folder / f, staged / f)
            old = library / f".{task}.old"
            shutil.rmtree(old, ignore_errors=True)
            (library / task).rename(old)              # two renames: never a half-copied expert in place
            staged.rename(library / task)
            shutil.rmtree(old)
            _copy_base_accuracy(candidates, library, task)
        decisions.append(d)
    return decisions


def _copy_base_accuracy(candidates: Path, library: Path, task: str) -> None:
    """The base model's figures measured beside the candidate (both shifts) replace the library's for `task`."""
    src, dst = candidates / "base_accuracy.json", library / "base_accuracy.json"
    if not src.exists():
        return
    entry = json.loads(src.read_text()).get(task)
    if entry is None:
        return
    known = json.loads(dst.read_text()) if dst.exists() else {}
    known[task] = entry
    tmp = dst.with_suffix(".tmp")
    tmp.write_text(json.dumps(known, indent=2, sort_keys=True) + "\n")
    tmp.replace(dst)
