"""Build an ESFT adapter for one task on an MoE base: measure routing affinity, select, fine-tune, save.

Only the selected experts train. They are lifted out of the base's fused expert tensors into their
own fp32 parameters (`TunedExperts`), so the optimizer never sees anything else and the base's
weights stay bit-identical; everything else in the model has requires_grad=False.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from moerge.compute import autocast
from moerge.experts.training import RECIPES, accuracy, collate, encode_example, load_tokenizer, train_step
from moerge.moe.base import MoeBase
from moerge.moe.esft import DEFAULT_THRESHOLD, METRICS, WEIGHTS_NAME, expert_key, save_esft, select_experts
from moerge.tasks import get_task


@dataclass
class EsftConfig:
    task: str
    metric: str = "token"                 # "token" (token selection ratio) | "gate" (average gate score)
    threshold: float | None = None        # cumulative affinity p; None: ESFT's default for the metric
    max_per_layer: int | None = None
    affinity_samples: int = 128           # training-pool samples the affinity is measured on
    steps: int = 100
    lr: float = 1e-4                      # ESFT used 1e-5 over 500 steps of 128 x 4096 tokens; ours are short
    weight_decay: float = 0.1             # ESFT's AdamW settings
    betas: tuple[float, float] = (0.9, 0.95)
    batch_size: int = 16
    data_seed: int = 0
    seed: int = 0
    warmup: int = 10
    eval_every: int = 50
    early_stop_acc: float = 0.97          # on a dev set drawn from the *training* templates
    dev_size: int = 32
    max_new_tokens: int = 40
    data: str = "template-lists-v0"       # the training data recipe, as for LoRA experts
    threads: int = field(default_factory=lambda: torch.get_num_threads())

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r}: use one of {list(METRICS)}")
        if self.threshold is None:
            self.threshold = DEFAULT_THRESHOLD[self.metric]


def load_moe_model(base: MoeBase):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    model.config.use_cache = False
    return model


def moe_blocks(model) -> list[nn.Module]:
    """The sparse MoE block of each layer (transformers 5 names it `mlp`: gate = router, experts = fused)."""
    return [layer.mlp for layer in model.model.layers]


@torch.inference_mode()
def routing_affinity(model, batches: list[dict[str, torch.Tensor]], top_k: int,
                     skip_prefix: int = 0) -> dict[str, torch.Tensor]:
    """ESFT's two affinities of the tokens in `batches` (prompt and answer, padding left out), [L, M] each:
    "gate": the mean softmax router probability of each expert; "token": the share of top-k slots it wins
    (its token selection ratio over k). Both rows sum to 1. `skip_prefix`: leave out each sequence's first
    tokens (the chat template's opening, the same in every request: it says nothing about the task)."""
    blocks = moe_blocks(model)
    logits: list[list[torch.Tensor]] = [[] for _ in blocks]
    hooks = [b.gate.register_forward_hook(lambda _m, _a, out, i=i: logits[i].append(out[0].float()))
             for i, b in enumerate(blocks)]
    masks = []
    try:
        for batch in batches:
            with autocast():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            keep = batch["attention_mask"].bool().clone()
            keep[:, :skip_prefix] = False                                # right-padded: position = token index
            masks.append(keep.reshape(-1))
    finally:
        for h in hooks:
            h.remove()
    mask = torch.cat(masks)
    n_tokens = max(1, int(mask.sum()))
    gate, token = [], []
    for per_layer in logits:
        lg = torch.cat(per_layer)[mask]                                   # [tokens, M]
        probs = lg.softmax(-1)
        gate.append(probs.sum(0) / n_tokens)
        picks = torch.zeros_like(probs).scatter_(1, lg.topk(top_k, dim=-1).indices, 1.0)
        token.append(picks.sum(0) / (n_tokens * top_k))
    return {"gate": torch.stack(gate), "token": torch.stack(token)}


class TunedExperts(nn.Module):
    """A layer's experts with some of them replaced by trainable copies; the base tensors stay frozen."""

    def __init__(self, experts: nn.Module, ids: list[int]):
        super().__init__()
        self.base = experts
        self.ids = list(ids)
        self.act_fn = experts.act_fn
        self.gate_up = nn.ParameterList([nn.Parameter(experts.gate_up_proj[e].detach().float().clone()) for e in ids])
        self.down = nn.ParameterList([nn.Parameter(experts.down_proj[e].detach().float().clone()) for e in ids])
        self._slot = {e: i for i, e in enumerate(ids)}

    def weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of logical expert e."""
        if e in self._slot:
            return self.gate_up[self._slot[e]], self.down[self._slot[e]]
        return self.base.gate_up_proj[e], self.base.down_proj[e]

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # x: [tokens, H]; top_k_index, top_k_weights: [tokens, k]
        out = torch.zeros_like(x)
        for e in top_k_index.unique().tolist():
            tok, slot = torch.where(top_k_index == e)
            gate_up, down = self.weights(e)
            g, u = nn.functional.linear(x[tok], gate_up).chunk(2, dim=-1)
            y = nn.functional.linear(self.act_fn(g) * u, down) * top_k_weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """This layer's tuned experts under the adapter's keys (w1 = gate, w3 = up, w2 = down)."""
        out = {}
        for e, gate_up, down in zip(self.ids, self.gate_up, self.down):
            w1, w3 = gate_up.detach().chunk(2, dim=0)
            out[expert_key(layer, e, "w1")] = w1
            out[expert_key(layer, e, "w3")] = w3
            out[expert_key(layer, e, "w2")] = down.detach()
        return out


def make_tunable(model, experts: dict[int, list[int]]) -> list[nn.Parameter]:
    """Freeze the whole model, swap in TunedExperts where `experts` selects any; return the trainable params."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer, block in enumerate(moe_blocks(model)):
        if experts.get(layer):
            block.experts = TunedExperts(block.experts, experts[layer])
    return [p for p in model.parameters() if p.requires_grad]


def tuned_tensors(model) -> dict[str, torch.Tensor]:
    out = {}
    for layer, block in enumerate(moe_blocks(model)):
        if isinstance(block.experts, TunedExperts):
            out.update(block.experts.tensors(layer))
    return out


def _lr_at(step: int, cfg: EsftConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batches(encoded, batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    return [collate(encoded[i:i + batch_size], pad_id) for i in range(0, len(encoded), batch_size)]


def train_selected(model, tok, cfg: EsftConfig, params: list[nn.Parameter], encoded, dev,
                   show_progress: bool = True) -> tuple[list[float], list[dict], bool]:
    """The fine-tuning loop (bf16 autocast where native, warmup + cosine, dev-set early stopping); returns losses, evals,
    stopped_early."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    losses: list[float] = []
    evals: list[dict] = []
    bar = tqdm(range(cfg.steps), desc=f"esft {cfg.task}", disable=not show_progress, mininterval=5)
    model.train()
    for step in bar:
        batch = collate(encoded[step * cfg.batch_size:(step + 1) * cfg.batch_size], tok.pad_token_id)
        losses.append(train_step(model, batch, opt, params, _lr_at(step, cfg)))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done = step + 1
        if dev and done % cfg.eval_every == 0 and done < cfg.steps:
            model.eval()
            acc, _ = accuracy(cfg.task, model, tok, dev, cfg.max_new_tokens)
            model.train()
            evals.append({"step": done, "dev_acc": acc})
            if acc >= cfg.early_stop_acc:
                model.eval()
                return losses, evals, True
    model.eval()
    return losses, evals, False


def build_esft(base: MoeBase, cfg: EsftConfig, out: Path, *, show_progress: bool = True,
               progress=print) -> dict:
    """Measure, select, fine-tune and save one task's ESFT adapter into `out`; return its manifest."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    task = get_task(cfg.task)
    shift = RECIPES[cfg.data]
    tok = load_tokenizer(base.path)
    model = load_moe_model(base)

    # dev and affinity data come from the training pool, never from evaluation content
    samples = task.samples(cfg.steps * cfg.batch_size, cfg.data_seed, "train", shift)
    dev = task.samples(cfg.dev_size, cfg.data_seed + 1_000_003, "train", shift)
    probe = task.samples(cfg.affinity_samples, cfg.data_seed + 2_000_003, "train", shift)
    encoded = [encode_example(tok, s.prompt, s.answer) for s in samples]
    probe_batches = _batches([encode_example(tok, s.prompt, s.answer) for s in probe], cfg.batch_size,
                             tok.pad_token_id)
    progress(f"routing affinity of {cfg.task} on {base.id} ({len(probe)} samples)")
    from moerge.moe.build import _user_spans
    opening = _user_spans([ids for ids, _ in encoded[:64]])[0][0] if len(encoded) > 1 else 0
    affinity = routing_affinity(model, probe_batches, base.top_k, skip_prefix=opening)
    experts = select_experts(affinity[cfg.metric], cfg.threshold, cfg.max_per_layer)
    n = sum(map(len, experts.values()))
    progress(f"selected {n} experts over {len(experts)} layers ({cfg.metric}, p={cfg.threshold}): "
             + " ".join(f"{layer}:{ids}" for layer, ids in experts.items()))

    params = make_tunable(model, experts)
    acc0, _ = accuracy(cfg.task, model, tok, dev, cfg.max_new_tokens)
    progress(f"dev accuracy before training: {acc0:.3f}")
    losses, evals, stopped_early = train_selected(model, tok, cfg, params, encoded, dev, show_progress)
    final_acc, _ = accuracy(cfg.task, model, tok, dev, cfg.max_new_tokens)

    selection = {"metric": cfg.metric, "threshold": cfg.threshold, "max_per_layer": cfg.max_per_layer,
                 "samples": len(probe),
                 "affinity": {m: [[round(v, 5) for v in row] for row in a.tolist()] for m, a in affinity.items()}}
    training = {"config": asdict(cfg), "steps_run": len(losses), "stopped_early": stopped_early,
                "loss_curve": losses, "dev_evals": evals, "dev_acc_before": acc0, "dev_acc": final_acc,
                "train_seconds": round(time.time() - t0, 1), "torch": torch.__version__,
                "trainable_params": sum(p.numel() for p in params)}
    save_esft(out, base, experts, tuned_tensors(model), task=cfg.task, selection=selection, training=training)
    weights = Path(out) / WEIGHTS_NAME
    manifest = {"task": cfg.task, "base_moe": base.version, "experts": {str(k): v for k, v in experts.items()},
                "n_experts": n, "adapter_bytes": weights.stat().st_size,
                "adapter_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), **training}
    (Path(out) / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
