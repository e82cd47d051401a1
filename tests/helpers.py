"""Builders used by tests: tiny random models and peft adapters with non-zero weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_llama_folder(folder: Path, *, hidden: int = 64, layers: int = 2, vocab: int = 256) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return Path(folder)


def make_lora(base_folder: Path, out: Path, *, base_name: str, r: int = 4, seed: int = 0,
              targets: tuple[str, ...] = ("q_proj", "v_proj", "up_proj", "down_proj"),
              scale_b: float = 0.05) -> Path:
    """A peft LoRA on base_folder with random (non-zero) B, saved as safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_folder)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale_b)
    peft_model.save_pretrained(out, safe_serialization=True)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_name
    cfg_path.write_text(json.dumps(cfg))
    return Path(out)


def tree_snapshot(root: Path, ignore: tuple[str, ...] = (".lock",)) -> dict[str, bytes]:
    """Every file under root with its bytes (to assert 'byte-for-byte unchanged')."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.is_file() and p.name not in ignore}


# <|im_start|>, <|im_end|>: vLLM reports the stop token in its output ids, the reference engine does not
STOP_TOKENS = (1, 2)


def answer_tokens(generation) -> list[int]:
    """A generation's token ids without the chat stop tokens, so two engines' outputs compare."""
    return [t for t in generation.token_ids if t not in STOP_TOKENS]


def pinned(*names: str):
    """The routing decision of a request that names its experts."""
    from moerge.router.base import ExpertScore, RoutingDecision
    return RoutingDecision("pinned", "sequence", experts=[ExpertScore(n, 1.0) for n in names], chosen=list(names))


def random_joint_set(pool, *, seed: int = 0, layers: int = 30, d: int = 576, d_mlp: int = 1536):
    """A joint gate set over the pool's LoRA experts with random gates (for engine tests, where only
    shapes and agreement matter), made the pool's current set."""
    from moerge.experts.joint_gates import KINDS, JointGates, _digest, save_to_pool
    cards = sorted((c for c in pool.list() if c.kind == "lora"), key=lambda c: c.name)
    g = torch.Generator().manual_seed(seed)
    gates = {f"{i}.{k}": torch.randn(len(cards), d_mlp if k == "down" else d, generator=g)
             for i in range(layers) for k in KINDS}
    names, versions = [c.name for c in cards], [c.artifacts["adapter_weights"] for c in cards]
    jg = JointGates(names, versions, gates, {"params": {}})
    jg.version = _digest(names, versions, gates)
    save_to_pool(pool, jg)
    return jg
