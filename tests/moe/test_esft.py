"""ESFT adapters: ESFT's selection rule, routing affinity, training that moves only the selected experts,
the adapter folder's validation (each bad input a typed error that leaves the pool as it was), atomic
registration, the pool's hard-linked folder and the merged reference checkpoint."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moerge.compute import autocast
from moerge.experts import errors
from moerge.moe.base import MANIFEST, WEIGHTS, MoeBase, moe_root, set_current
from moerge.moe.esft import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    expert_key,
    load_esft,
    merged_checkpoint,
    select_experts,
)
from moerge.moe.esft_train import (
    EsftConfig,
    build_esft,
    load_moe_model,
    make_tunable,
    routing_affinity,
    train_selected,
    tuned_tensors,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


# -- fixtures ------------------------------------------------------------------------------------------
def tiny_moe(folder: Path, tokenizer_dir: Path, *, experts: int = 4, layers: int = 2, seed: int = 0) -> MoeBase:
    """A random Mixtral (hidden 32) with the real tokenizer and a moerge_moe.json manifest."""
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=49152, num_local_experts=experts, num_experts_per_tok=2,
                        max_position_embeddings=512, tie_word_embeddings=True)
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():                   # a sharper router than the default init, so affinities differ
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    model.to(torch.bfloat16).save_pretrained(folder)
    for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, folder / f)
    version = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    names = ["base"] + [f"e{i}" for i in range(1, experts)]
    (folder / MANIFEST).write_text(json.dumps({"version": version, "experts": names, "sources": [""] * experts,
                                               "base_model": "tiny", "router_init": "random"}))
    return MoeBase.load(folder)


def install_moe(pool_root: Path, src: MoeBase) -> MoeBase:
    dest = moe_root(pool_root) / src.version[:16]
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src.path, dest)
    base = MoeBase.load(dest)
    set_current(pool_root, base)
    return base


def fake_embed(texts):
    return np.stack([np.frombuffer(hashlib.sha256(t.encode()).digest()[:32], dtype=np.uint8).astype(np.float32)
                     for t in texts])


@pytest.fixture(scope="module")
def moe(tmp_path_factory, base_model_dir) -> MoeBase:
    return tiny_moe(tmp_path_factory.mktemp("tiny-moe"), base_model_dir)


@pytest.fixture(scope="module")
def built(tmp_path_factory, moe) -> tuple[Path, dict]:
    """An ESFT adapter of the tiny base, 4 steps."""
    out = tmp_path_factory.mktemp("esft") / "arith_add"
    cfg = EsftConfig(task="arith_add", steps=4, batch_size=4, lr=1e-2, warmup=1, affinity_samples=16, dev_size=4,
                     max_new_tokens=4, eval_every=1000, threads=1)
    return out, build_esft(moe, cfg, out, show_progress=False, progress=lambda m: None)


@pytest.fixture
def esft_pool(tmp_path, moe, tiny_spec):
    from moerge.experts.pool import ExpertPool
    root = tmp_path / "pool"
    root.mkdir()
    install_moe(root, moe)
    pool = ExpertPool(root, f"sqlite:///{root}/registry.sqlite", tiny_spec, embed=fake_embed)
    yield pool
    pool.close()


def pool_state(pool) -> tuple:
    blobs = sorted(p.name for p in (pool.root / "store").rglob("*") if p.is_file()) \
        if (pool.root / "store").exists() else []
    return pool.names(), blobs, sorted(str(p.relative_to(pool.root)) for p in pool.root.rglob("*")
                                       if p.is_file() and p.name != ".lock" and "registry.sqlite" not in p.name)


# -- selection -------------------------------------------------------------------------------------------
def test_selection_takes_experts_until_their_cumulative_affinity_reaches_p():
    aff = torch.tensor([[0.05, 0.5, 0.3, 0.15],
                        [0.7, 0.1, 0.1, 0.1]])
    assert select_experts(aff, 0.6) == {0: [1, 2], 1: [0]}
    assert select_experts(aff, 0.5) == {0: [1], 1: [0]}          # reaching p exactly is enough
    assert select_experts(aff, 0.81) == {0: [1, 2, 3], 1: [0, 1, 2]}
    assert select_experts(aff, 1.0) == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}


def test_selection_breaks_ties_by_the_lower_id_and_caps_each_layer():
    aff = torch.full((1, 4), 0.25)
    assert select_experts(aff, 0.3) == {0: [0, 1]}
    assert select_experts(aff, 0.9, max_per_layer=2) == {0: [0, 1]}
    assert select_experts(torch.tensor([[0.1, 0.4, 0.4, 0.1]]), 0.2) == {0: [1]}
    with pytest.raises(ValueError):
        select_experts(aff, 0.0)


def test_default_thresholds_are_esfts():
    assert EsftConfig(task="arith_add", metric="token").threshold == 0.2
    assert EsftConfig(task="arith_add", metric="gate").threshold == 0.1
    assert EsftConfig(task="arith_add", metric="gate", threshold=0.3).threshold == 0.3


# -- affinity -------------------------------------------------------------------------------------------
def _batch(tok, texts):
    from moerge.experts.training import collate, encode_example
    return collate([encode_example(tok, t, "42") for t in texts], tok.pad_token_id)


@pytest.mark.real   # the real base model's tokenizer
def test_affinity_rows_sum_to_one_match_a_direct_router_count_and_ignore_padding(moe):
    from moerge.experts.training import load_tokenizer
    tok = load_tokenizer(moe.path)
    model = load_moe_model(moe).eval()
    texts = ["What is 2 + 2?", "Add 13 and 29, then tell me the sum please, only the number."]
    together = routing_affinity(model, [_batch(tok, texts)], moe.top_k)
    apart = routing_affinity(model, [_batch(tok, [t]) for t in texts], moe.top_k)
    for metric in ("gate", "token"):
        a = together[metric]
        assert a.shape == (moe.n_layers, moe.n_experts)
        torch.testing.assert_close(a.sum(1), torch.ones(moe.n_layers))
        torch.testing.assert_close(a, apart[metric], atol=2e-3, rtol=0)   # padding left out
    # direct: transformers' own router logits of one unpadded prompt
    batch = _batch(tok, texts[:1])
    with torch.inference_mode(), autocast():
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_router_logits=True)
    logits = out.router_logits[0].float()
    one = routing_affinity(model, [batch], moe.top_k)
    torch.testing.assert_close(one["gate"][0], logits.softmax(-1).mean(0), atol=1e-4, rtol=0)
    counts = torch.bincount(logits.topk(moe.top_k, -1).indices.reshape(-1), minlength=moe.n_experts)
    torch.testing.assert_close(one["token"][0], counts.float() / counts.sum(), atol=1e-6, rtol=0)
    # the chat template's opening left out: only the tokens after it count
    skip = routing_affinity(model, [batch], moe.top_k, skip_prefix=20)
    torch.testing.assert_close(skip["gate"][0], logits[20:].softmax(-1).mean(0), atol=1e-4, rtol=0)


# -- training -------------------------------------------------------------------------------------------
@pytest.mark.real   # the real base model's tokenizer
def test_training_moves_only_the_selected_experts(moe):
    from moerge.experts.training import encode_example, load_tokenizer
    from moerge.tasks import get_task
    tok = load_tokenizer(moe.path)
    model = load_moe_model(moe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    selected = {0: [1, 3], 1: [2]}
    params = make_tunable(model, selected)
    assert sum(p.numel() for p in params) == 3 * 3 * moe.hidden * moe.intermediate
    cfg = EsftConfig(task="arith_add", steps=3, batch_size=4, lr=1e-2, warmup=1, eval_every=1000)
    samples = get_task("arith_add").samples(12, 0, "train")
    losses, _, _ = train_selected(model, tok, cfg, params, [encode_example(tok, s.prompt, s.answer) for s in samples],
                                  [], show_progress=False)
    assert len(losses) == 3
    after = {k.replace("experts.base.", "experts."): v for k, v in model.state_dict().items()
             if ".experts.gate_up." not in k and ".experts.down." not in k}
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], f"frozen parameters changed: {changed}"
    tuned = tuned_tensors(model)
    assert set(tuned) == {expert_key(layer, e, p) for layer, ids in selected.items() for e in ids
                          for p in ("w1", "w3", "w2")}
    fused = before["model.layers.0.mlp.experts.gate_up_proj"][1].float()
    assert not torch.equal(tuned[expert_key(0, 1, "w1")], fused[:moe.intermediate])


@pytest.mark.real   # the real base model's tokenizer
def test_build_saves_exactly_the_selected_experts_and_loads_back(built, moe):
    out, manifest = built
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["format"] == "moerge-esft/1" and cfg["base_moe"] == moe.version and cfg["task"] == "arith_add"
    assert cfg["selection"]["metric"] == "token" and cfg["selection"]["threshold"] == 0.2
    assert len(cfg["selection"]["affinity"]["token"]) == moe.n_layers
    assert manifest["steps_run"] == 4 and manifest["adapter_bytes"] == (out / WEIGHTS_NAME).stat().st_size
    adapter = load_esft(out, moe)
    assert {str(k): v for k, v in adapter.experts.items()} == cfg["experts"]
    on_disk = load_file(str(out / WEIGHTS_NAME))
    assert all(t.dtype == torch.bfloat16 for t in on_disk.values())
    assert set(on_disk) == {expert_key(layer, e, p) for layer, ids in adapter.experts.items() for e in ids
                            for p in ("w1", "w3", "w2")}
    # selection is what the rule gives on the recorded affinity
    aff = torch.tensor(cfg["selection"]["affinity"]["token"])
    assert select_experts(aff, 0.2) == adapter.experts


# -- validation: every bad input is a typed error and leaves the pool as it was -------------------------
def _weights_edit(fn):
    def edit(folder: Path, base: MoeBase):
        t = load_file(str(folder / WEIGHTS_NAME))
        fn(t, base)
        save_file(t, str(folder / WEIGHTS_NAME))
    return edit


def _config_edit(fn):
    def edit(folder: Path, base: MoeBase):
        cfg = json.loads((folder / CONFIG_NAME).read_text())
        fn(cfg, base)
        (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    return edit


def _first_key(t):
    return sorted(t)[0]


BAD = {
    "another base": (_config_edit(lambda c, b: c.update(base_moe="0" * 64)), errors.WrongBaseModelError, "MoE base"),
    "layer out of range": (_config_edit(lambda c, b: c["experts"].update({str(b.n_layers): [0]})),
                           errors.ShapeMismatchError, "layers 0.."),
    "expert id out of range": (_config_edit(lambda c, b: c["experts"].update(
        {k: v + [b.n_experts] for k, v in list(c["experts"].items())[:1]})), errors.ShapeMismatchError, "experts 0.."),
    "duplicate ids": (_config_edit(lambda c, b: c["experts"].update(
        {k: v + v[:1] for k, v in list(c["experts"].items())[:1]})), errors.AdapterConfigError, "twice"),
    "tensor missing": (_weights_edit(lambda t, b: t.pop(_first_key(t))), errors.AdapterWeightsError, "lacks"),
    "tensor extra": (_weights_edit(lambda t, b: t.update(
        {expert_key(0, b.n_experts - 1, "w9"): torch.zeros(2, 2)})), errors.AdapterWeightsError, "does not declare"),
    "wrong shape": (_weights_edit(lambda t, b: t.update({_first_key(t): torch.zeros(3, 3, dtype=torch.bfloat16)})),
                    errors.ShapeMismatchError, "need"),
    "NaN": (_weights_edit(lambda t, b: t[_first_key(t)].view(-1).__setitem__(0, float("nan"))),
            errors.NonFiniteWeightsError, "NaN"),
    "Inf": (_weights_edit(lambda t, b: t[_first_key(t)].view(-1).__setitem__(5, float("inf"))),
            errors.NonFiniteWeightsError, "NaN or Inf"),
    "pickle beside": (lambda f, b: (f / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01."),
                      errors.UnsafeFormatError, "pickle"),
    "pickle instead": (lambda f, b: (f / WEIGHTS_NAME).rename(f / "esft_model.pt"), errors.UnsafeFormatError, "pickle"),
    "no weights": (lambda f, b: (f / WEIGHTS_NAME).unlink(), errors.AdapterWeightsError, "no esft_model"),
    "weights not safetensors": (lambda f, b: (f / WEIGHTS_NAME).write_bytes(b"garbage" * 10),
                                errors.AdapterWeightsError, "not a readable"),
    "config not json": (lambda f, b: (f / CONFIG_NAME).write_text("{nope"), errors.AdapterConfigError, "JSON"),
    "config another format": (_config_edit(lambda c, b: c.update(format="peft")), errors.AdapterConfigError,
                              "moerge-esft/1"),
    "empty experts": (_config_edit(lambda c, b: c.update(experts={})), errors.AdapterConfigError, "non-empty"),
}


@pytest.mark.real   # the real base model's tokenizer
@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_adapter_is_a_typed_error_and_leaves_the_pool_unchanged(case, built, esft_pool, tmp_path, moe):
    edit, error, words = BAD[case]
    folder = tmp_path / "bad"
    shutil.copytree(built[0], folder)
    edit(folder, moe)
    esft_pool.register_esft(built[0], "good", "fine")   # the pool is not empty: a failure must not touch it
    before = pool_state(esft_pool)
    with pytest.raises(error, match=words):
        esft_pool.register_esft(folder, "bad", "broken")
    assert pool_state(esft_pool) == before


@pytest.mark.real   # the real base model's tokenizer
def test_an_adapter_over_the_size_limit_is_413_and_leaves_the_pool_unchanged(built, esft_pool):
    esft_pool.max_esft_bytes = (built[0] / WEIGHTS_NAME).stat().st_size - 1
    before = pool_state(esft_pool)
    with pytest.raises(errors.UploadTooLargeError) as e:
        esft_pool.register_esft(built[0], "big")
    assert e.value.status == 413 and pool_state(esft_pool) == before


@pytest.mark.real   # the real base model's tokenizer
def test_a_pool_without_an_moe_base_refuses_and_says_what_to_run(built, tiny_spec, tmp_path):
    from moerge.experts.pool import ExpertPool
    from moerge.moe.base import MoeBaseError
    root = tmp_path / "nomoe"
    pool = ExpertPool(root, f"sqlite:///{root}/registry.sqlite", tiny_spec, embed=fake_embed)
    with pytest.raises(MoeBaseError, match="moerge moe build"):
        pool.register_esft(built[0], "x")
    assert pool.names() == []
    pool.close()


# -- registration ----------------------------------------------------------------------------------------
@pytest.mark.real   # the real base model's tokenizer
def test_registration_stores_the_card_and_both_files(built, esft_pool, moe):
    card = esft_pool.register_esft(built[0], "add-esft", "adds numbers", tags=["math"], examples=["1+1?", "2+3?"])
    got = esft_pool.get("add-esft")
    assert got.kind == "esft" and got.base_model == moe.id
    assert {"esft_config", "esft_weights", "card_embedding", "example_embeddings"} <= set(got.artifacts)
    info = got.extra["esft"]
    adapter = load_esft(built[0], moe)
    assert info["experts"] == adapter.n_experts and info["layers"] == len(adapter.experts)
    assert info["base_moe"] == moe.version
    assert esft_pool.artifact_bytes(card, "esft_weights") == (built[0] / WEIGHTS_NAME).read_bytes()
    with pytest.raises(errors.NameTakenError):
        esft_pool.register_esft(built[0], "add-esft")


@pytest.mark.real   # the real base model's tokenizer
def test_registration_that_fails_at_the_commit_leaves_nothing(built, esft_pool, monkeypatch):
    before = pool_state(esft_pool)

    def boom(conn, card):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(esft_pool.registry, "insert", boom)
    with pytest.raises(errors.StorageFullError):
        esft_pool.register_esft(built[0], "add-esft")
    assert pool_state(esft_pool) == before


@pytest.mark.real   # the real base model's tokenizer
def test_esft_dir_is_a_hard_linked_loadable_folder(built, esft_pool, moe, tiny_adapter):
    card = esft_pool.register_esft(built[0], "add-esft")
    folder = esft_pool.esft_dir(card)
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (folder / name).read_bytes() == (built[0] / name).read_bytes()
    assert (folder / WEIGHTS_NAME).stat().st_ino == esft_pool.store.path(card.artifacts["esft_weights"]).stat().st_ino
    assert esft_pool.esft_dir(card) == folder
    assert load_esft(folder, moe).experts == load_esft(built[0], moe).experts
    lora = esft_pool.register_lora(tiny_adapter, "lora1")
    with pytest.raises(errors.ExpertError, match="not an ESFT"):
        esft_pool.esft_dir(lora)
    with pytest.raises(errors.ExpertError, match="not a LoRA"):
        esft_pool.adapter_dir(card)


# -- the merged reference ---------------------------------------------------------------------------------
@pytest.mark.real   # the real base model's tokenizer
def test_merged_checkpoint_computes_what_the_base_with_the_adapter_computes(built, moe, tmp_path):
    from transformers import AutoModelForCausalLM
    adapter = load_esft(built[0], moe)
    merged = MoeBase.load(merged_checkpoint(moe, adapter, tmp_path / "merged"))
    assert merged.version == hashlib.sha256((merged.path / WEIGHTS).read_bytes()).hexdigest() != moe.version
    ref = AutoModelForCausalLM.from_pretrained(merged.path, dtype=torch.float32).eval()
    served = load_moe_model(moe).eval()
    make_tunable(served, adapter.experts)
    with torch.no_grad():
        for layer, ids in adapter.experts.items():
            ex = served.model.layers[layer].mlp.experts
            for slot, e in enumerate(ids):
                ex.gate_up[slot].copy_(torch.cat([adapter.tensors[expert_key(layer, e, "w1")],
                                                  adapter.tensors[expert_key(layer, e, "w3")]]).float())
                ex.down[slot].copy_(adapter.tensors[expert_key(layer, e, "w2")].float())
    ids = torch.tensor([[1, 9038, 314, 253, 1345, 30, 2]])
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, served(input_ids=ids).logits
        base_logits = load_moe_model(moe).eval()(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(a, base_logits, atol=1e-4)   # the adapter does change the model


# -- the real base ------------------------------------------------------------------------------------------
@pytest.mark.real
@pytest.mark.slow
def test_a_short_esft_build_on_a_real_moe_base_registers_and_validates(tmp_path, real_spec, base_model_dir):
    """A real MoE base (the dense SmolLM2 + two bundled LoRA experts, built by moerge.moe.build in a fresh
    pool), a 4-step ESFT build for arith_add, registered and read back through esft_dir."""
    from moerge.experts.bundled import LIBRARY, library_entries
    from moerge.experts.pool import ExpertPool
    from moerge.moe.base import current_moe
    from moerge.moe.build import build_moe
    root = tmp_path / "pool"
    pool = ExpertPool(root, f"sqlite:///{root}/registry.sqlite", real_spec, embed=fake_embed)
    try:
        entries = {e["name"]: e for e in library_entries()}
        for name in ("arith_add", "uppercase"):
            pool.register_lora(LIBRARY / name, name, entries[name]["description"], examples=entries[name]["examples"])
        base = build_moe(pool, base_model_dir, ["arith_add", "uppercase"], prompts_per_expert=4, progress=lambda m: None)
        assert current_moe(root) == base and base.n_experts == 3 and base.hidden == 576
        cfg = EsftConfig(task="arith_add", steps=4, batch_size=4, warmup=1, affinity_samples=16, dev_size=4,
                         max_new_tokens=8, eval_every=1000)
        out = tmp_path / "esft"
        manifest = build_esft(base, cfg, out, show_progress=False, progress=lambda m: None)
        adapter = load_esft(out, base)
        assert len(adapter.experts) == base.n_layers and manifest["steps_run"] == 4
        assert manifest["adapter_bytes"] == pytest.approx(adapter.n_experts * 3 * 576 * 1536 * 2, rel=0.01)
        card = pool.register_esft(out, "esft-arith_add", "adds numbers", examples=["What is 2 + 3?"])
        assert card.base_model == base.id and card.extra["esft"]["experts"] == adapter.n_experts
        assert load_esft(pool.esft_dir(card), base).experts == adapter.experts
    finally:
        pool.close()


@pytest.mark.real   # the real base model's tokenizer
def test_cli_add_esft_without_an_moe_base_is_one_line_saying_what_to_run(tmp_path, real_settings, built):
    import os
    import subprocess
    import sys
    env = {**os.environ, "MOERGE_HOME": str(real_settings.home), "MOERGE_POOL_DIR": str(tmp_path / "pool"),
           "MOERGE_BUNDLED_POOL": "false", "MOERGE_CONFIG": str(tmp_path / "none.toml")}
    proc = subprocess.run([sys.executable, "-m", "moerge.cli", "experts", "add-esft", str(built[0]), "--name", "x"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "moerge moe build" in proc.stderr and "Traceback" not in proc.stderr
