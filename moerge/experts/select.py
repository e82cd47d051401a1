"""Choose between a library expert and a retrained candidate on development sets only.

`moerge experts choose --candidates DIR [--install]`. For each task with a candidate in DIR, both
adapters answer the same development prompts: the hand-written training templates (both recipes
train on them) over training content, from both recipes (template-lists-v0 over the template lists,
content-pools-v1 over the training pool), with a seed no training run or early stop uses. Evaluation
templates and the evaluation pool are never read. The content development set keeps only prompts
with content that neither expert trained on (a content key absent from both training sets,
regenerated from their manifests): the training pool
of an entity task is small enough that training covers it all (capital_of: every training country),
and a development set over it measures memory, not the skill. When fewer than MIN_UNSEEN such
prompts exist, the content skill cannot be judged on development data and the incumbent stays.
The candidate replaces the incumbent when its mean over the two development sets is higher by
at least `margin`; the decision, with both experts' figures, goes into the candidate's manifest as
`selection`, and into the library's manifest when it is installed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from moerge.experts.build import recorded_recipe
from moerge.experts.training import RECIPES, accuracy, load_tokenizer
from moerge.tasks import get_task

SELECT_SEED = 2_000_003     # training runs draw data_seed (0) and dev data_seed + 1_000_003
N_DEV = 48
MIN_UNSEEN = 16
DRAW = 6000                 # content prompts drawn before keeping the unseen ones on the shared templates
FILES = ("adapter_config.json", "adapter_model.safetensors", "gate.safetensors", "manifest.json")


def trained_content(folder: Path) -> set[str]:
    """The content keys an expert's training samples used, regenerated from its manifest's config."""
    try:
        cfg = json.loads((folder / "manifest.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return set()               # no recorded training config (a hand-made adapter): nothing known seen
    shift = RECIPES[recorded_recipe(folder)]
    samples = get_task(cfg["task"]).samples(cfg["steps"] * cfg["batch_size"], cfg["data_seed"], "train", shift)
    return {k for s in samples for k in s.content}


def dev_sets(task: str, seen: set[str], n: int) -> dict[str, list]:
    """{recipe: samples}: the template-lists development prompts, and content-pool ones whose content
    has a key outside `seen` (possibly fewer than n). The content prompts use only the hand-written
    training templates, which both recipes train on (content-pools-v1's family starts with them): the
    generated paraphrases are the candidate's own training phrasings, and over them the content set
    would measure which expert knows the phrasing, not the content."""
    t = get_task(task)
    shared = len(t.train_templates)
    unseen = [s for s in t.samples(DRAW, SELECT_SEED, "train", "content")
              if s.template < shared and not set(s.content) <= seen]
    return {"template-lists-v0": t.samples(n, SELECT_SEED, "train", "template"), "content-pools-v1": unseen[:n]}


def dev_accuracy(base_dir: Path, adapter_dir: Path, task: str, sets: dict[str, list]) -> dict[str, float]:
    """{recipe: accuracy} of one adapter on the development sets."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      adapter_dir).eval()
    out = {}
    for recipe, samples in sets.items():
        if not samples:
            continue
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
        sets = dev_sets(task, trained_content(library / task) | trained_content(folder), n)
        n_unseen = len(sets["content-pools-v1"])
        inc, cand = dev_accuracy(base_dir, library / task, task, sets), dev_accuracy(base_dir, folder, task, sets)
        mean = lambda d: sum(d.values()) / len(d)      # noqa: E731
        judged = n_unseen >= min(MIN_UNSEEN, n)
        take = judged and mean(cand) >= mean(inc) + margin
        d = {"task": task, "incumbent_dev": inc, "candidate_dev": cand, "margin": margin, "replace": take,
             "reason": ("higher mean development accuracy" if take else "not higher by the margin") if judged else
                       f"only {n_unseen} content development prompts unseen by training (< {MIN_UNSEEN}): "
                       "the content skill cannot be judged, the incumbent stays",
             "dev": {"seed": SELECT_SEED, "n": n, "split": "train", "recipes": list(RECIPES),
                     "content_unseen_by_training": n_unseen}}
        log(f"{task}: incumbent dev {inc}, candidate dev {cand} ({n_unseen} unseen-content prompts) -> "
            f"{'replace' if take else 'keep'}")
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
