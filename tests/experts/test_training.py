"""Expert training end to end on a tiny random model (real tokenizer): resumable and deterministic."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from moerge.experts import training
from moerge.experts.gates import train_gate
from moerge.experts.lora import base_spec_from_folder, load_lora
from moerge.experts.training import TrainConfig, train_lora


def _cfg(**kw):
    return TrainConfig(task="uppercase", steps=6, batch_size=4, rank=2, alpha=4, eval_every=3, dev_size=4,
                       checkpoint_every=2, early_stop_acc=1.01, max_new_tokens=4, **kw)


@pytest.mark.real
def test_training_writes_adapter_and_manifest(tiny_chat_base, tmp_path):
    m = train_lora(tiny_chat_base, _cfg(), tmp_path / "e", show_progress=False)
    assert m["steps_run"] == 6 and len(m["loss_curve"]) == 6
    assert [e["step"] for e in m["dev_evals"]] == [3]
    assert m["config"]["rank"] == 2 and m["config"]["data_seed"] == 0 and m["train_templates"]
    tensors = load_file(str(tmp_path / "e" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert not (tmp_path / "e" / ".checkpoint").exists()
    spec = base_spec_from_folder(str(tiny_chat_base), "tiny")
    adapter = load_lora(tmp_path / "e", spec)   # what we train, we can register
    assert any(float(b.abs().sum()) > 0 for _, b in adapter.weights.values())


@pytest.mark.real
def test_interrupted_training_resumes_to_identical_bytes(tiny_chat_base, tmp_path, monkeypatch):
    train_lora(tiny_chat_base, _cfg(), tmp_path / "full", show_progress=False)
    original = training._lr_at

    def crash_at_step_5(step, cfg):
        if step == 4:
            raise KeyboardInterrupt
        return original(step, cfg)

    monkeypatch.setattr(training, "_lr_at", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_lora(tiny_chat_base, _cfg(), tmp_path / "resumed", show_progress=False)
    assert (tmp_path / "resumed" / ".checkpoint").exists()
    monkeypatch.setattr(training, "_lr_at", original)
    m = train_lora(tiny_chat_base, _cfg(), tmp_path / "resumed", show_progress=False)
    assert m["steps_run"] == 6
    a = (tmp_path / "full" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "resumed" / "adapter_model.safetensors").read_bytes()
    assert a == b


@pytest.mark.real
def test_gate_training_moves_only_the_gates(tiny_chat_base, tmp_path):
    train_lora(tiny_chat_base, _cfg(), tmp_path / "e", show_progress=False)
    adapter = load_lora(tmp_path / "e", base_spec_from_folder(str(tiny_chat_base), "tiny"))
    before = {k: (a.clone(), b.clone()) for k, (a, b) in adapter.weights.items()}
    out = train_gate(tiny_chat_base, adapter, ["shout: hi there"] * 4, ["HI THERE"] * 4, steps=5, batch_size=2,
                     show_progress=False)
    assert set(out["gates"]) == set(adapter.weights)
    assert all(float(v.abs().sum()) > 0 for v in out["gates"].values())
    for k, (a, b) in adapter.weights.items():
        assert torch.equal(a, before[k][0]) and torch.equal(b, before[k][1])
