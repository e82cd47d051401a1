"""Train one LoRA expert per task with peft: seeded data, bf16 autocast where the CPU has native bf16
(moerge/compute.py; float32 elsewhere), resumable, with a manifest.

Data is generated up front from `data_seed` with the task's training templates, so step k
always sees the same batch; there is no dropout. A run is therefore a pure function of its
config (given the same torch build, compute dtype and thread count), which is what lets `moerge experts
build` rebuild the committed library and lets an interrupted run resume from its last
checkpoint (adapter + optimizer state, stored as safetensors, never pickled).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from moerge.compute import autocast, resolve_dtype
from moerge.experts.lora import read_safetensors
from moerge.models.chat import encode_chat, encode_chat_answer, stop_token_ids
from moerge.tasks import get_task

RECIPES = {"template-lists-v0": "template", "content-pools-v1": "content"}   # recipe -> Task.samples shift
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    task: str
    steps: int = 150
    lr: float = 2e-3
    rank: int = 4
    alpha: int = 8
    targets: tuple[str, ...] = ALL_LINEAR
    batch_size: int = 16
    data_seed: int = 0
    seed: int = 0
    warmup: int = 10
    eval_every: int = 50
    early_stop_acc: float = 0.97   # on a dev set drawn from the *training* templates
    dev_size: int = 32
    checkpoint_every: int = 25
    max_new_tokens: int = 40
    # the training data recipe (docs/TASKS.md): "template-lists-v0" = the hand-written training
    # templates over the template lists (the committed library); "content-pools-v1" = the
    # paraphrase family over the training pools of tasks/content.py
    data: str = "template-lists-v0"
    threads: int = field(default_factory=lambda: torch.get_num_threads())

    def fingerprint(self) -> str:
        d = asdict(self)
        d.pop("threads")
        if d["data"] == "template-lists-v0":      # the recipe before it had a name: same fingerprints
            d.pop("data")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_tokenizer(base_dir: Path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.padding_side = "left"
    return tok


def user_turn(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def encode_example(tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids and labels; only the answer and the closing end of turn are learned."""
    ids, prompt_len = encode_chat_answer(tok, user_turn(prompt), answer)
    return ids, [-100] * prompt_len + ids[prompt_len:]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@torch.inference_mode()
def greedy_answers(model, tok, prompts: list[str], max_new_tokens: int = 40, batch_size: int = 32) -> list[str]:
    """Batched greedy decoding through the chat template (left padding)."""
    outs = []
    for i in range(0, len(prompts), batch_size):
        chunk = [encode_chat(tok, user_turn(p)) for p in prompts[i:i + batch_size]]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for j, c in enumerate(chunk):
            ids[j, width - len(c):] = torch.tensor(c)
            mask[j, width - len(c):] = 1
        with autocast():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id)
        outs += tok.batch_decode(gen[:, width:], skip_special_tokens=True)
    return outs


def accuracy(task_name: str, model, tok, samples, max_new_tokens: int = 40) -> tuple[float, list[str]]:
    task = get_task(task_name)
    preds = greedy_answers(model, tok, [s.prompt for s in samples], max_new_tokens)
    return sum(task.score(p, s.answer) for p, s in zip(preds, samples)) / max(1, len(samples)), preds


def shared_prefix_len(batch: dict) -> int:
    """How many leading tokens every row of `batch` shares, stopping before the first learned token
    (so the hidden state that predicts it is computed per row)."""
    ids, labels = batch["input_ids"], batch["labels"]
    same = (ids == ids[:1]).all(dim=0)
    common = int(same.long().cumprod(0).sum())
    first_label = int((labels != -100).float().argmax(dim=1).min())
    return max(0, min(common, first_label - 1))


def answer_loss(model, batch: dict) -> torch.Tensor:
    """The causal-LM loss over the learned tokens (mean, as `model(**batch).loss`), computed with less work:
    - the prefix every row shares (the chat template's system turn) runs once, and its keys and values
      are repeated for the batch; gradients flow through it once;
    - the vocabulary projection runs only where a token is learned (the answer), not at every position.

    `model` is a causal LM with `.model` (the decoder) and `.lm_head`, peft-wrapped or not.
    tests/experts/test_training.py checks it against `model(**batch).loss` and its gradients."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    rows, width = ids.shape
    p = shared_prefix_len(batch)
    cache = None
    if p > 0:
        cache = lm.model(input_ids=ids[:1, :p], use_cache=True).past_key_values
        cache.batch_repeat_interleave(rows)
    positions = torch.arange(p, width).unsqueeze(0).expand(rows, -1)
    hidden = lm.model(input_ids=ids[:, p:], attention_mask=mask, position_ids=positions, past_key_values=cache,
                      use_cache=cache is not None).last_hidden_state            # [rows, width - p, d]
    target = labels[:, p + 1:]                                                  # the token each position predicts
    learned = target != -100
    logits = lm.lm_head(hidden[:, :-1][learned])                                # [learned tokens, vocab]
    return torch.nn.functional.cross_entropy(logits.float(), target[learned])


def train_step(model, batch: dict, opt, params: list, lr: float, loss_fn=None) -> float:
    """One optimiser step at `lr` (bf16 autocast where the CPU has native bf16, gradient norm clipped to 1); the loss, rounded.
    `loss_fn(model, batch)` defaults to the model's own loss."""
    for g in opt.param_groups:
        g["lr"] = lr
    with autocast():
        loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return round(loss.item(), 5)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _save_checkpoint(ckpt: Path, model, opt, step: int, losses: list[float], cfg: TrainConfig, evals: list) -> None:
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_file(params, str(tmp / "params.safetensors"))
    opt_tensors, scalars = {}, {}
    for i, (name, p) in enumerate((n, p) for n, p in model.named_parameters() if p.requires_grad):
        st = opt.state.get(p, {})
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim > 0:
                opt_tensors[f"{name}::{k}"] = v.clone()
            else:
                scalars[f"{name}::{k}"] = float(v)
    if opt_tensors:
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses, "scalars": scalars,
                                                "fingerprint": cfg.fingerprint(), "evals": evals}))
    shutil.rmtree(ckpt, ignore_errors=True)
    os.replace(tmp, ckpt)


def _load_checkpoint(ckpt: Path, model, opt, cfg: TrainConfig):
    state = json.loads((ckpt / "state.json").read_text())
    if state["fingerprint"] != cfg.fingerprint():
        return 0, [], []
    params = read_safetensors(ckpt / "params.safetensors")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in params.items():
            named[n].copy_(t)
    tensors = read_safetensors(ckpt / "optimizer.safetensors") if (ckpt / "optimizer.safetensors").exists() else {}
    for n, p in named.items():
        if not p.requires_grad:
            continue
        st = {}
        for key, val in state["scalars"].items():
            if key.startswith(n + "::"):
                st[key.split("::", 1)[1]] = torch.tensor(val)
        for key, val in tensors.items():
            if key.startswith(n + "::"):
                st[key.split("::", 1)[1]] = val
        if st:
            opt.state[p] = st
    return state["step"], state["losses"], state.get("evals", [])


def save_adapter_bf16(peft_model, out: Path) -> None:
    """peft layout (adapter_config.json + adapter_model.safetensors) with bf16 tensors."""
    peft_model.save_pretrained(out, safe_serialization=True)
    path = out / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in sorted(read_safetensors(path).items())}
    save_file(tensors, str(path), metadata={"format": "pt"})
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    readme = out / "README.md"
    readme.unlink(missing_ok=True)


def train_lora(base_dir: Path, cfg: TrainConfig, out: Path, *, base_model_id: str | None = None,
               show_progress: bool = True) -> dict:
    """Train (or resume) one expert into `out`; return its manifest (also written to out/manifest.json)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    task = get_task(cfg.task)
    tok = load_tokenizer(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.config.use_cache = False
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(cfg.targets),
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    if base_model_id:
        peft_model.peft_config["default"].base_model_name_or_path = base_model_id
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    shift = RECIPES[cfg.data]
    samples = task.samples(cfg.steps * cfg.batch_size, cfg.data_seed, "train", shift)
    dev = task.samples(cfg.dev_size, cfg.data_seed + 1_000_003, "train", shift)
    encoded = [encode_example(tok, s.prompt, s.answer) for s in samples]

    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / ".checkpoint"
    start, losses, evals = (0, [], [])
    if ckpt.exists():
        start, losses, evals = _load_checkpoint(ckpt, peft_model, opt, cfg)
    t0 = time.time()
    stopped_early = bool(evals and evals[-1]["dev_acc"] >= cfg.early_stop_acc)
    bar = tqdm(range(start, cfg.steps), desc=f"train {cfg.task}", initial=start, total=cfg.steps,
               disable=not show_progress, mininterval=5)
    peft_model.train()
    for step in bar:
        if stopped_early:
            break
        batch = collate(encoded[step * cfg.batch_size:(step + 1) * cfg.batch_size], tok.pad_token_id)
        losses.append(train_step(peft_model, batch, opt, params, _lr_at(step, cfg), answer_loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done = step + 1
        if done % cfg.eval_every == 0 and done < cfg.steps:
            peft_model.eval()
            acc, _ = accuracy(cfg.task, peft_model, tok, dev, cfg.max_new_tokens)
            peft_model.train()
            evals.append({"step": done, "dev_acc": acc})
            stopped_early = acc >= cfg.early_stop_acc
        if done % cfg.checkpoint_every == 0 or stopped_early:
            _save_checkpoint(ckpt, peft_model, opt, done, losses, cfg, evals)
    peft_model.eval()
    save_adapter_bf16(peft_model, out)
    manifest = {
        "task": cfg.task, "config": {**asdict(cfg), "targets": list(cfg.targets)},
        "fingerprint": cfg.fingerprint(), "steps_run": len(losses), "stopped_early": stopped_early,
        "train_templates": task.templates("train", shift), "loss_curve": losses, "dev_evals": evals,
        "train_seconds_this_run": round(time.time() - t0, 1),
        "loss": "answer_loss: mean cross-entropy over the answer tokens; the shared chat prefix run once per batch",
        "torch": torch.__version__, "compute_dtype": resolve_dtype(), "adapter_bytes": (out / "adapter_model.safetensors").stat().st_size,
        "adapter_sha256": hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(ckpt, ignore_errors=True)
    return manifest
