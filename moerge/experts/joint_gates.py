"""Jointly trained gates: the pool's LoRA experts told apart by the base model's own hidden states.

PHATGOOSE gates and Arrow prototypes are each fitted to one expert alone, so their scores are not
comparable across experts: routed per token they pick the own expert for about 15-19% of the user's
tokens (docs/results/token_gate_diagnostic.json). A *joint* gate set is one linear softmax classifier
over all of the pool's experts for every distinct input of every layer (attention in, o_proj in, MLP
in, down_proj in: the four inputs of the adapted linears), trained on the base model's hidden states
of each expert's prompts, with every other expert's prompts as its negatives:

    logit_e(x) = standardise(x) · g_e / √d        (the form the engines already compute for PHATGOOSE)

Trained on the tokens of the user's text (the chat template around it carries no task), it is used
pooled: the mean of a module's logits over the user's tokens routes the whole request at that module
(`moerge.router.joint`). Because it depends on the whole library, the set is retrained when the library
changes (`moerge experts train-joint`, or on first use by `moerge eval`); a set whose experts no longer
match the pool is reported stale and routes only the experts it knows at their trained versions.

Data: each card's example prompts, plus training-split samples of the card's task (both recipes:
`template` and `content`) when the card names one. Never evaluation paraphrases or evaluation content.
Stored in `<pool>/gatesets/joint/<version[:16]>/` (gates.safetensors + manifest.json), with a
`current` pointer, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moerge.experts.errors import ExpertError
from moerge.kernels.gating import standardise

KINDS = ("attn", "o", "mlp", "down")
# every adapted linear (the base model's names and vLLM's packed ones) -> the input it reads
KIND_OF = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "qkv_proj": "attn", "o_proj": "o",
           "gate_proj": "mlp", "up_proj": "mlp", "gate_up_proj": "mlp", "down_proj": "down"}
_HOOKS = (("attn", "self_attn.q_proj"), ("o", "self_attn.o_proj"), ("mlp", "mlp.gate_proj"),
          ("down", "mlp.down_proj"))
_LAYER = re.compile(r"layers\.(\d+)\.")
FORMAT = 1
CURRENT = "current"


class JointGatesError(ExpertError):
    """No joint gate set, or one that cannot be trained or read (the message says what to do)."""
    status = 409


def module_key(name: str) -> str | None:
    """'model.layers.3.self_attn.q_proj' (or vLLM's '...qkv_proj') -> '3.attn'; None when not adapted."""
    m = _LAYER.search(name)
    kind = KIND_OF.get(name.rsplit(".", 1)[-1])
    return f"{m.group(1)}.{kind}" if m and kind else None


class HiddenReader:
    """The base model (transformers, fp32) read at the four inputs of every layer, over the user's text.

    One forward per prompt; thread-safe (one at a time). The user's span is found from the chat
    template: the tokens before the user's text and after it are the same for every prompt."""

    def __init__(self, base_dir: Path | str):
        from transformers import AutoModelForCausalLM

        from moerge.experts.training import load_tokenizer
        from moerge.models.chat import encode_chat

        self._encode = encode_chat
        self.tok = load_tokenizer(base_dir)
        self.model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        self._seen: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.model.model.layers):
            for kind, path in _HOOKS:
                layer.get_submodule(path).register_forward_hook(
                    lambda _m, inp, _out, key=f"{i}.{kind}": self._seen.__setitem__(key, inp[0][0]))
        marker = "\u2063"
        empty = encode_chat(self.tok, [{"role": "user", "content": marker}])
        mark = self.tok(marker, add_special_tokens=False)["input_ids"]
        self.head = next(i for i in range(len(empty)) if empty[i:i + len(mark)] == mark)
        self.tail = len(empty) - self.head - len(mark)
        self.keys = [f"{i}.{k}" for i in range(len(self.model.model.layers)) for k, _ in _HOOKS]
        self._lock = threading.Lock()

    def read(self, prompt: str) -> dict[str, torch.Tensor]:
        """module key -> [T_user, d] standardised inputs at the user's tokens (float32)."""
        ids = self._encode(self.tok, [{"role": "user", "content": prompt}])
        end = max(self.head + 1, len(ids) - self.tail)
        with self._lock, torch.inference_mode():
            self._seen.clear()
            self.model(input_ids=torch.tensor([ids]))
            return {k: standardise(v[self.head:end].float()) for k, v in self._seen.items()}


@dataclass
class JointGates:
    experts: list[str]                  # class e's expert name
    versions: list[str]                 # and the adapter version it was trained on
    gates: dict[str, torch.Tensor]      # module key -> [E, d]
    meta: dict = field(default_factory=dict)
    version: str = ""                   # sha256 of the gate tensors and the experts they separate

    def pooled_logits(self, states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """module key -> [E]: the logits averaged over the user's tokens."""
        out = {}
        for key, g in self.gates.items():
            x = states[key]
            out[key] = (x.mean(0) @ g.T) / math.sqrt(x.shape[-1])
        return out

    @staticmethod
    def vote(pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        """[E]: each module's softmax, averaged over modules (a distribution over the experts)."""
        return torch.stack([torch.softmax(v, 0) for v in pooled.values()]).mean(0)

    def known(self, pool) -> dict[str, bool]:
        """name -> trained on the pool's current version of that expert."""
        cards = {c.name: c for c in pool.list()}
        return {n: (n in cards and cards[n].artifacts.get("adapter_weights") == v)
                for n, v in zip(self.experts, self.versions)}

    def stale(self, pool) -> list[str]:
        """What no longer matches the pool: experts gone or retrained, LoRA experts added since."""
        cards = {c.name: c for c in pool.list() if c.kind == "lora"}
        out = [f"{n} changed or removed" for n, ok in self.known(pool).items() if not ok]
        out += [f"{n} added" for n in sorted(set(cards) - set(self.experts))]
        return out

    # -- files ---------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.float().contiguous() for k, v in self.gates.items()}, str(folder / "gates.safetensors"))
        (folder / "manifest.json").write_text(json.dumps(
            {"format": FORMAT, "version": self.version, "experts": self.experts, "versions": self.versions,
             **self.meta}, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "JointGates":
        from safetensors.torch import load_file
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
            gates = load_file(str(folder / "gates.safetensors"))
        except Exception as e:     # a missing file, bad JSON, or safetensors' own error on a damaged file
            raise JointGatesError(f"joint gate set at {folder} cannot be read ({e}): retrain it with "
                                  "`moerge experts train-joint`") from e
        if manifest.get("format") != FORMAT:
            raise JointGatesError(f"joint gate set at {folder} has format {manifest.get('format')}, "
                                  f"not {FORMAT}: retrain it with `moerge experts train-joint`")
        E = len(manifest["experts"])
        bad = [k for k, v in gates.items() if v.ndim != 2 or v.shape[0] != E or not torch.isfinite(v).all()]
        if bad or not gates:
            raise JointGatesError(f"joint gate set at {folder} is damaged (modules {bad[:3]}): retrain it")
        meta = {k: v for k, v in manifest.items() if k not in ("format", "version", "experts", "versions")}
        return cls(list(manifest["experts"]), list(manifest["versions"]), gates, meta, manifest["version"])


def _digest(experts: list[str], versions: list[str], gates: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps([experts, versions]).encode())
    for k in sorted(gates):
        h.update(k.encode())
        h.update(gates[k].float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _root(pool) -> Path:
    return Path(pool.root) / "gatesets" / "joint"


def current_joint(pool) -> JointGates | None:
    """The pool's current joint gate set, or None when it has never been trained."""
    pointer = _root(pool) / CURRENT
    if not pointer.exists():
        return None
    return JointGates.load(_root(pool) / pointer.read_text().strip())


def save_to_pool(pool, jg: JointGates) -> Path:
    """Write the set under its version and point `current` at it; a crash leaves the old pointer."""
    root = _root(pool)
    folder = root / jg.version[:16]
    if not folder.exists():
        tmp = root / f".{jg.version[:16]}.{os.getpid()}.{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        jg.save(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not folder.exists():
                raise
    tmp_ptr = root / f".{CURRENT}.{os.getpid()}"
    tmp_ptr.write_text(jg.version[:16] + "\n")
    os.replace(tmp_ptr, root / CURRENT)
    return folder


def training_prompts(card, per_recipe: int, seed: int, split: str = "train") -> list[str]:
    """The card's example prompts (train only) and `per_recipe` training samples of its task per recipe."""
    out = list(card.examples) if split == "train" else []
    task = (card.extra or {}).get("task")
    if task:
        from moerge.tasks import BY_NAME
        if task in BY_NAME:
            for recipe in ("template", "content"):
                out += [s.prompt for s in BY_NAME[task].samples(per_recipe, seed, "train", recipe)]
    if not out and split == "train":
        out = [card.description or card.name]
    return out


def train_joint_gates(pool, base_dir: Path | str, *, per_recipe: int = 16, steps: int = 200, lr: float = 0.05,
                      weight_decay: float = 1e-4, seed: int = 0, dev_per_recipe: int = 4,
                      reader: HiddenReader | None = None, progress=lambda msg: None) -> JointGates:
    """Train a joint gate set over the pool's LoRA experts (at least two). Dev accuracy, on training-split
    prompts of another seed (never evaluation ones), is recorded in the manifest."""
    cards = sorted((c for c in pool.list() if c.kind == "lora"), key=lambda c: c.name)
    if len(cards) < 2:
        raise JointGatesError(f"joint gates separate experts from each other: the pool has {len(cards)} "
                              "LoRA expert(s), at least 2 are needed")
    torch.manual_seed(seed)
    t0 = time.time()
    reader = reader or HiddenReader(base_dir)
    per_module: dict[str, list[torch.Tensor]] = {k: [] for k in reader.keys}
    labels: list[torch.Tensor] = []
    n_prompts = 0
    for e, card in enumerate(cards):
        for prompt in training_prompts(card, per_recipe, seed):
            st = reader.read(prompt)
            for k, v in st.items():
                per_module[k].append(v.half())
            labels.append(torch.full((next(iter(st.values())).shape[0],), e))
            n_prompts += 1
        progress(f"joint gates: read {n_prompts} prompts ({e + 1}/{len(cards)} experts, {time.time() - t0:.0f} s)")
    y = torch.cat(labels)
    E = len(cards)
    gates: dict[str, torch.Tensor] = {}
    losses = {}
    for i, (k, chunks) in enumerate(per_module.items()):
        x = torch.cat(chunks).float()
        d = x.shape[1]
        g = torch.zeros(E, d, requires_grad=True)
        opt = torch.optim.Adam([g], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ g.T / math.sqrt(d), y) + weight_decay * g.square().sum()
            loss.backward()
            opt.step()
        gates[k] = g.detach().clone()
        losses[k] = round(loss.item(), 4)
        if (i + 1) % 20 == 0:
            progress(f"joint gates: trained {i + 1}/{len(per_module)} modules ({time.time() - t0:.0f} s)")
    experts = [c.name for c in cards]
    versions = [c.artifacts.get("adapter_weights", "") for c in cards]
    jg = JointGates(experts, versions, gates)
    dev = _dev_accuracy(jg, reader, cards, dev_per_recipe, seed + 1) if dev_per_recipe else {}
    jg.meta = {"trained_at": time.time(), "seconds": round(time.time() - t0, 1), "tokens": int(len(y)),
               "prompts": n_prompts, "params": {"per_recipe": per_recipe, "steps": steps, "lr": lr,
                                                "weight_decay": weight_decay, "seed": seed},
               "final_loss_mean": round(sum(losses.values()) / len(losses), 4), "dev": dev}
    jg.version = _digest(experts, versions, gates)
    progress(f"joint gates: {E} experts, {len(gates)} modules, dev {dev} ({time.time() - t0:.0f} s)")
    return jg


def _dev_accuracy(jg: JointGates, reader: HiddenReader, cards, per_recipe: int, seed: int) -> dict:
    """Own expert first, on training-split prompts of another seed: per module (pooled) and by the vote."""
    per_module, votes, n = 0.0, 0.0, 0
    for e, card in enumerate(cards):
        for prompt in training_prompts(card, per_recipe, seed, split="dev"):
            pooled = jg.pooled_logits(reader.read(prompt))
            per_module += sum(float(v.argmax() == e) for v in pooled.values()) / len(pooled)
            votes += float(JointGates.vote(pooled).argmax() == e)
            n += 1
    if not n:
        return {}
    return {"prompts": n, "own_top1_per_module": round(per_module / n, 4), "own_top1_vote": round(votes / n, 4)}


def ensure_joint(pool, base_dir: Path | str, cache_dir: Path | None = None, *, force: bool = False,
                 progress=lambda msg: None, **params) -> JointGates:
    """The pool's joint gate set for its current LoRA experts: the current one when it matches the pool,
    else one from `cache_dir` trained before for the same experts, base model and parameters, else a
    new one (trained, cached, made current)."""
    import inspect
    defaults = {k: p.default for k, p in inspect.signature(train_joint_gates).parameters.items()
                if p.kind is p.KEYWORD_ONLY and k not in ("reader", "progress")}
    params = {**defaults, **params}     # the same set, however it was asked for
    if not force:
        jg = current_joint(pool)
        if jg is not None and not jg.stale(pool) and all(jg.meta.get("params", {}).get(k) == v
                                                          for k, v in params.items()):
            return jg
    cards = sorted((c.name, c.artifacts.get("adapter_weights", "")) for c in pool.list() if c.kind == "lora")
    key = hashlib.sha256(json.dumps([FORMAT, str(base_dir), cards, sorted(params.items())]).encode()).hexdigest()[:16]
    cached = Path(cache_dir) / key if cache_dir is not None else None
    if cached is not None and cached.exists() and not force:
        try:
            jg = JointGates.load(cached)
            progress(f"joint gates: reusing {cached}")
        except JointGatesError:
            shutil.rmtree(cached, ignore_errors=True)
            jg = None
        if jg is not None:
            save_to_pool(pool, jg)
            return jg
    jg = train_joint_gates(pool, base_dir, progress=progress, **params)
    save_to_pool(pool, jg)
    if cached is not None:
        tmp = cached.with_name(f".{key}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        jg.save(tmp)
        shutil.rmtree(cached, ignore_errors=True)
        os.rename(tmp, cached)
    return jg
