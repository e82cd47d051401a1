"""Train and store the PHATGOOSE gate of a registered LoRA (CLI and HTTP share this)."""

from __future__ import annotations

from pathlib import Path

from moerge.experts.card import ExpertCard
from moerge.experts.errors import ExpertError
from moerge.experts.gates import gates_to_bytes, train_gate
from moerge.experts.lora import load_lora


def train_gate_for_card(pool, name: str, prompts: list[str], answers: list[str], *, steps: int = 100,
                        base_dir: Path | None = None, show_progress: bool = True) -> ExpertCard:
    card = pool.get(name)
    if card.kind != "lora":
        raise ExpertError(f"expert {name!r} is a {card.kind}: only LoRA experts have gates")
    if len(prompts) < 4 or len(prompts) != len(answers):
        raise ExpertError("gate training needs at least 4 examples, each with a prompt and an answer")
    if base_dir is None:
        from moerge.assets import ensure_base_model
        from moerge.config import get_settings
        base_dir = ensure_base_model(get_settings())
    adapter = load_lora(pool.adapter_dir(card), pool.base_spec)
    result = train_gate(base_dir, adapter, prompts, answers, steps=steps, show_progress=show_progress)
    return pool.update(name, artifacts={"gate": gates_to_bytes(result["gates"])},
                       extra={"gate": {"steps": steps, "examples": len(prompts),
                                       "final_loss": result["loss_curve"][-1]}})


__all__ = ["train_gate_for_card"]
