"""PHATGOOSE gates, trained post hoc: one vector v per adapted module, everything else frozen.

During training each adapted linear computes y = W x + σ(v·x) · s · B A x, and only v
learns, from the expert's own examples, so v comes to point at the inputs on which the
expert's update helps. At inference the router standardises x and v and compares the
score across experts (moerge/router/phatgoose.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from moerge.compute import autocast
from moerge.experts.lora import LoraAdapter
from moerge.experts.training import collate, encode_example, load_tokenizer


class GatedLoraLinear(torch.nn.Module):
    """y = W x + σ(v·x) · s · B A x with W, A, B frozen and v trainable (init 0, so σ = 1/2)."""

    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scaling: float):
        super().__init__()
        self.base = base
        self.register_buffer("a", a.float())   # [r, d_in]
        self.register_buffer("b", b.float())   # [d_out, r]
        self.scaling = scaling
        self.gate = torch.nn.Parameter(torch.zeros(base.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(x @ self.gate.to(x.dtype)).unsqueeze(-1)          # [..., 1]
        lora = (x @ self.a.to(x.dtype).T) @ self.b.to(x.dtype).T             # [..., d_out]
        return self.base(x) + g * self.scaling * lora


def inject_gated_lora(model: torch.nn.Module, adapter: LoraAdapter) -> dict[str, GatedLoraLinear]:
    layers = {}
    for name, (a, b) in adapter.weights.items():
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        layer = GatedLoraLinear(getattr(parent, child), a, b, adapter.scaling[name])
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def train_gate(base_dir: Path, adapter: LoraAdapter, prompts: list[str], answers: list[str], *, steps: int = 100,
               lr: float = 5e-3, batch_size: int = 8, seed: int = 0, show_progress: bool = True) -> dict:
    """Return {"gates": {module: v [d_in]}, "loss_curve": [...], "seconds": float}."""
    from transformers import AutoModelForCausalLM

    if not prompts or len(prompts) != len(answers):
        raise ValueError("gate training needs examples: pairs of (prompt, answer)")
    torch.manual_seed(seed)
    tok = load_tokenizer(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    layers = inject_gated_lora(model, adapter)
    gates = [layer.gate for layer in layers.values()]
    opt = torch.optim.Adam(gates, lr=lr)
    encoded = [encode_example(tok, p, a) for p, a in zip(prompts, answers)]
    g = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.time()
    for _ in tqdm(range(steps), desc="train gate", disable=not show_progress, mininterval=5):
        idx = torch.randint(len(encoded), (batch_size,), generator=g).tolist()
        batch = collate([encoded[i] for i in idx], tok.pad_token_id)
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 5))
    vectors = {name: layer.gate.detach().clone().contiguous() for name, layer in layers.items()}
    return {"gates": vectors, "loss_curve": losses, "seconds": round(time.time() - t0, 1)}


def gates_to_bytes(gates: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.float().contiguous() for k, v in sorted(gates.items())})
