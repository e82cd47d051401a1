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


def _lora_and_batch(base_dir, rows: int = 6):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from moerge.tasks import get_task
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=list(training.ALL_LINEAR),
                                                  task_type="CAUSAL_LM"))
    for n, p in peft_model.named_parameters():        # non-zero B, so LoRA changes the shared prefix too
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    tok = training.load_tokenizer(base_dir)
    samples = get_task("reverse_words").samples(rows, 3, "train", "content")
    batch = training.collate([training.encode_example(tok, s.prompt, s.answer) for s in samples], tok.pad_token_id)
    return peft_model, batch


@pytest.mark.real
def test_answer_loss_equals_the_models_own_loss_and_gradients(base_model_dir):
    """The fast loss (shared chat prefix run once, vocabulary only where an answer token is learned) is the
    same loss with the same gradients as the model's own forward, on the real base model."""
    model, batch = _lora_and_batch(base_model_dir)
    assert training.shared_prefix_len(batch) > 10            # the system turn is shared
    params = [p for p in model.parameters() if p.requires_grad]
    slow = model(**batch).loss
    slow_grads = torch.autograd.grad(slow, params)
    fast = training.answer_loss(model, batch)
    fast_grads = torch.autograd.grad(fast, params)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-5), (float(fast), float(slow))
    worst = max(float((f - s).abs().max() / (s.abs().max() + 1e-12)) for f, s in zip(fast_grads, slow_grads))
    assert worst < 1e-4, worst


def test_shared_prefix_stops_before_the_first_learned_token():
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]])
    labels = torch.full_like(ids, -100)
    labels[0, 3:] = ids[0, 3:]       # row 0 learns from position 3: its prediction comes from position 2
    labels[1, 5:] = ids[1, 5:]
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    assert training.shared_prefix_len(batch) == 2
    labels[0, 3:] = -100
    labels[0, 5:] = ids[0, 5:]
    assert training.shared_prefix_len(batch) == 4       # all five shared, but position 4 predicts a learned token
