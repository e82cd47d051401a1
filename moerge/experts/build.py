"""`moerge experts build`: train the bundled library (one LoRA + gate per held-in task).

Each expert lands in LIBRARY/<task>/ with adapter_config.json, adapter_model.safetensors
(bf16), gate.safetensors and manifest.json; LIBRARY/library.json indexes them for
`load_bundled`. Finished experts whose manifest matches the config are skipped, and an
interrupted LoRA run resumes from its checkpoint, so the command can simply be run again.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from moerge.config import BASE_MODEL_ID
from moerge.experts.gates import gates_to_bytes, train_gate
from moerge.experts.lora import base_spec_from_folder, load_lora
from moerge.experts.training import RECIPES, TrainConfig, accuracy, load_tokenizer, train_lora
from moerge.tasks import HELD_IN, get_task

EVAL_SEED = 20261124     # evaluation paraphrases: never used for training or early stopping
GATE_SEED = 7
ANSWERED_PER_SHIFT = 16   # library.json: answered training examples per recipe, per expert
N_EVAL = 50

SHIFTS = ("template", "content")

# Budgets: the maximum number of steps; every run stops early once its dev accuracy (training
# templates and the training content pool, separate seed) reaches 97%. Tasks that need
# computation, or that must learn a skill over an open vocabulary, get more steps.
MAX_STEPS = {"arith_add": 300, "arith_mul": 300, "count_words": 300, "number_to_words": 250,
             "sort_numbers": 250}
MAX_STEPS_POOLS = {**MAX_STEPS, "uppercase": 300, "reverse_words": 200}
DEFAULT_STEPS = 150


def default_config(task: str, data: str = "template-lists-v0") -> TrainConfig:
    if data not in RECIPES:
        raise ValueError(f"unknown data recipe {data!r}; recipes are {', '.join(RECIPES)}")
    steps = MAX_STEPS.get(task, DEFAULT_STEPS) if data == "template-lists-v0" else MAX_STEPS_POOLS.get(task, DEFAULT_STEPS)
    return TrainConfig(task=task, steps=steps, data=data)


def _max_tokens(tok, samples) -> int:
    """The longest answer's tokens plus 6, as the evaluation harness allows (an answer cut there is wrong anyway)."""
    return max(len(tok(s.answer)["input_ids"]) for s in samples) + 6


def _base_accuracy(base_dir: Path, tasks: list[str], cache: Path, log) -> dict[str, dict[str, float]]:
    """{task: {shift: accuracy}} of the base model alone, cached in the library folder."""
    from transformers import AutoModelForCausalLM

    known = json.loads(cache.read_text()) if cache.exists() else {}
    todo = [t for t in tasks if not isinstance(known.get(t), dict) or set(known[t]) != set(SHIFTS)]
    if todo:
        tok = load_tokenizer(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        for t in todo:
            known[t] = {sh: accuracy(t, model, tok, s, _max_tokens(tok, s))[0]
                        for sh in SHIFTS for s in [get_task(t).samples(N_EVAL, EVAL_SEED, "eval", sh)]}
            log(f"base model on {t}: " + ", ".join(f"{sh} {a:.0%}" for sh, a in known[t].items()))
        cache.write_text(json.dumps(known, indent=2, sort_keys=True) + "\n")
    return known


def _expert_accuracy(base_dir: Path, adapter_dir: Path, task: str) -> tuple[dict[str, float], list[dict]]:
    """{shift: accuracy} of one expert on the evaluation samples, and a few of its outputs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    accs, shown = {}, []
    for shift in SHIFTS:
        samples = get_task(task).samples(N_EVAL, EVAL_SEED, "eval", shift)
        accs[shift], preds = accuracy(task, model, tok, samples, _max_tokens(tok, samples))
        shown += [{"shift": shift, "prompt": s.prompt, "expected": s.answer, "got": p}
                  for s, p in zip(samples[:5], preds[:5])]
    return accs, shown


def recorded_config(folder: Path) -> TrainConfig | None:
    """The training config an expert's manifest records (what `--data recorded` rebuilds), or None."""
    try:
        cfg = dict(json.loads((folder / "manifest.json").read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    cfg.pop("threads", None)
    cfg["targets"] = tuple(cfg.get("targets", ()))
    try:
        return TrainConfig(**cfg)
    except TypeError:          # a manifest from a version with other config fields
        return None


def build_expert(base_dir: Path, task: str, out: Path, log=print, data: str = "template-lists-v0",
                 steps: int | None = None, cfg: TrainConfig | None = None) -> dict:
    """Train one expert into `out` (skipped when its manifest matches the config). `cfg` (a recorded
    config, which names its recipe) wins over `data` and `steps`; `steps` overrides the task's default
    step budget."""
    if cfg is None:
        cfg = default_config(task, data)
        if steps is not None:
            if steps < 1:
                raise ValueError(f"steps must be at least 1, not {steps}")
            cfg = replace(cfg, steps=steps)
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and (out / "gate.safetensors").exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == cfg.fingerprint() and "accuracy" in manifest:
            log(f"{task}: up to date, skipped")
            return manifest
    t0 = time.time()
    manifest = train_lora(base_dir, cfg, out, base_model_id=BASE_MODEL_ID)
    acc, shown = _expert_accuracy(base_dir, out, task)
    spec = base_spec_from_folder(str(base_dir), BASE_MODEL_ID)
    adapter = load_lora(out, spec)
    t = get_task(task)
    gate_samples = t.samples(400, GATE_SEED, "train", RECIPES[cfg.data])
    gate = train_gate(base_dir, adapter, [s.prompt for s in gate_samples], [s.answer for s in gate_samples],
                      seed=GATE_SEED)
    (out / "gate.safetensors").write_bytes(gates_to_bytes(gate["gates"]))
    manifest.update({
        "accuracy": {"expert": acc, "base": None, "n": N_EVAL, "eval_seed": EVAL_SEED,
                     "eval_templates": t.eval_templates, "shifts": list(SHIFTS)},
        "content_pools": {"source": "moerge/tasks/content.py (wordfreq top words, entity tables, number "
                                    "ranges), split by a hash of each item; training draws only from 'train'",
                          "train_templates": len(t.train_templates)},
        "examples_of_outputs": shown,
        "gate": {"steps": len(gate["loss_curve"]), "lr": 5e-3, "batch_size": 8, "seed": GATE_SEED,
                 "examples": len(gate_samples), "loss_curve": gate["loss_curve"]},
        "build_seconds": round(time.time() - t0, 1),
    })
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"{task}: expert " + ", ".join(f"{sh} {acc[sh]:.0%}" for sh in SHIFTS)
        + f" on {N_EVAL} evaluation prompts ({manifest['steps_run']} steps, {manifest['build_seconds']:.0f}s)")
    return manifest


def write_index(library: Path) -> None:
    entries = []
    for task in HELD_IN:
        folder = library / task
        if not (folder / "manifest.json").exists():
            continue
        t = get_task(task)
        examples = [s.prompt for s in t.samples(5, 99, "train")]
        # answered examples for `verify` (router/verify.py): training samples of both recipes, never evaluation ones
        answered = [{"prompt": s.prompt, "answer": s.answer}
                    for shift in ("template", "content") for s in t.samples(ANSWERED_PER_SHIFT, 98, "train", shift)]
        entries.append({"name": task, "task": task, "description": t.description, "tags": t.tags,
                        "examples": examples, "answered_examples": answered})
    (library / "library.json").write_text(json.dumps({"base_model": BASE_MODEL_ID, "experts": entries},
                                                     indent=2) + "\n")


def recorded_recipe(folder: Path) -> str:
    """The data recipe an expert's manifest records (first-release manifests, or none: template-lists-v0)."""
    cfg = recorded_config(folder)
    return cfg.data if cfg is not None else "template-lists-v0"


def build_library(base_dir: Path, library: Path, tasks: list[str] | None = None, log=print,
                  data: str = "recorded", steps: int | None = None) -> list[dict]:
    """Train every expert first, then measure the base model on the same samples and record it in
    each manifest next to the expert's accuracy. `data` "recorded": each expert with the training
    config its manifest in `library` records (recipe, steps, rank: so the bundled library rebuilds as
    committed, each expert skipped when it is up to date), template-lists-v0 for a new one; or one
    recipe for all, with the task's default step budget or `steps`."""
    if data != "recorded" and data not in RECIPES:
        raise ValueError(f"unknown data recipe {data!r}; recipes are recorded, {', '.join(RECIPES)}")
    tasks = tasks or list(HELD_IN)
    for t in tasks:
        if not get_task(t).held_in:
            raise ValueError(f"{t} is a held-out task: it gets no expert")
    library.mkdir(parents=True, exist_ok=True)
    manifests = []
    if data == "recorded" and steps is not None:
        raise ValueError("--steps trains with a given budget; with --data recorded each expert's budget is "
                         "the one its manifest records: name a recipe")
    for task in tasks:
        if data == "recorded":       # a new expert (no manifest yet): the first release's recipe
            manifests.append(build_expert(base_dir, task, library / task, log, cfg=recorded_config(library / task)))
        else:
            manifests.append(build_expert(base_dir, task, library / task, log, data, steps=steps))
        write_index(library)
    fresh = [(t, m) for t, m in zip(tasks, manifests) if isinstance(m["accuracy"].get("expert"), dict)]
    if fresh:       # experts built by this version record both shifts; measure the base model on the same samples
        base = _base_accuracy(base_dir, [t for t, _ in fresh], library / "base_accuracy.json", log)
        for task, manifest in fresh:
            if manifest["accuracy"].get("base") != base[task]:
                manifest["accuracy"]["base"] = base[task]
                (library / task / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifests
