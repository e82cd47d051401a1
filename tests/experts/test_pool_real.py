"""Registering a LoRA made with peft on the real base model."""

from __future__ import annotations

import pytest

from moerge.experts import errors as E
from moerge.experts.pool import ExpertPool
from tests.helpers import make_lora, tiny_llama_folder


@pytest.mark.real
def test_real_lora_registers_with_prototypes_per_module(tmp_path, base_model_dir, real_spec, embedder):
    adapter = make_lora(base_model_dir, tmp_path / "real", base_name="HuggingFaceTB/SmolLM2-135M-Instruct",
                        targets=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "k_proj"))
    root = tmp_path / "pool"
    pool = ExpertPool(root, f"sqlite:///{root}/r.sqlite", real_spec, embed=embedder.encode)
    card = pool.register_lora(adapter, "real", "a real adapter", examples=["hello"])
    protos = pool.artifact_tensors(card, "arrow")
    assert len(protos) == 30 * 7
    assert protos["model.layers.0.mlp.down_proj"].shape == (1536,)
    assert protos["model.layers.29.self_attn.q_proj"].shape == (576,)


@pytest.mark.real
def test_adapter_for_a_tiny_model_is_refused_by_the_real_base(tmp_path, real_spec, embedder):
    tiny = tiny_llama_folder(tmp_path / "tiny")
    adapter = make_lora(tiny, tmp_path / "a", base_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    root = tmp_path / "pool"
    pool = ExpertPool(root, f"sqlite:///{root}/r.sqlite", real_spec, embed=embedder.encode)
    with pytest.raises(E.ShapeMismatchError, match="another size"):
        pool.register_lora(adapter, "tiny", "wrong size")
