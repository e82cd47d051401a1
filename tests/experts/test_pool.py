"""The pool registers valid adapters with their artifacts and refuses bad ones, leaving no trace."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moerge.experts import errors as E
from moerge.experts.pool import ExpertPool
from moerge.kernels.arrow import top_right_singular_vector
from tests.helpers import make_lora, tree_snapshot


def test_register_lists_card_with_arrow_prototypes_and_embedding(tiny_pool, tiny_adapter):
    card = tiny_pool.register_lora(tiny_adapter, "adder", "adds two numbers", tags=["math"],
                                   examples=["what is 2 + 3?", "add 7 and 8"])
    assert [c.name for c in tiny_pool.list()] == ["adder"]
    assert {"adapter_config", "adapter_weights", "arrow", "card_embedding", "example_embeddings"} <= set(card.artifacts)
    assert card.rank == 4 and card.target_modules == ["down_proj", "q_proj", "up_proj", "v_proj"]
    protos = tiny_pool.artifact_tensors(card, "arrow")
    weights = load_file(str(tiny_adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    v = top_right_singular_vector(weights[f"{key}.lora_A.weight"], weights[f"{key}.lora_B.weight"])
    assert torch.allclose(protos["model.layers.0.self_attn.q_proj"], v)
    assert tiny_pool.artifact_tensors(card, "example_embeddings")["embeddings"].shape == (2, 384)
    # the stored adapter folder round-trips byte for byte
    folder = tiny_pool.adapter_dir(card)
    assert (folder / "adapter_model.safetensors").read_bytes() == (tiny_adapter / "adapter_model.safetensors").read_bytes()


def test_remove_cleans_artifacts_no_other_card_uses(tiny_pool, tiny_adapter):
    a = tiny_pool.register_lora(tiny_adapter, "a", "first")
    b = tiny_pool.register_lora(tiny_adapter, "b", "second")  # same weights: blobs shared
    assert a.artifacts["adapter_weights"] == b.artifacts["adapter_weights"]
    tiny_pool.remove("a")
    assert tiny_pool.store.has(b.artifacts["adapter_weights"])
    assert not tiny_pool.store.has(a.artifacts["card_embedding"])
    tiny_pool.remove("b")
    assert tiny_pool.store.all_digests() == set()


def test_update_reembeds_card_and_drops_old_embedding(tiny_pool, tiny_adapter):
    card = tiny_pool.register_lora(tiny_adapter, "x", "adds numbers")
    new = tiny_pool.update("x", description="translates French to English", tags=["language"])
    assert new.description.startswith("translates")
    assert new.artifacts["card_embedding"] != card.artifacts["card_embedding"]
    assert not tiny_pool.store.has(card.artifacts["card_embedding"])
    assert tiny_pool.get("x").tags == ["language"]


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_weights(folder, fn):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def _bad_inputs(folder, tmp_path, tiny_base):
    """name -> (mutation of the adapter folder, expected error, register name)."""
    def missing_config():
        (folder / "adapter_config.json").unlink()

    def unparsable_config():
        (folder / "adapter_config.json").write_text("{not json")

    def wrong_base():
        _edit_config(folder, base_model_name_or_path="meta-llama/Llama-3.1-8B")

    def absent_target():
        _edit_config(folder, target_modules=["q_proj", "w_pack"])

    def bad_shape():
        def f(t):
            k = next(k for k in t if "q_proj.lora_A" in k)
            t[k] = torch.randn(4, 32)
        _edit_weights(folder, f)

    def rank_zero():
        _edit_config(folder, r=0)

    def rank_huge():
        _edit_config(folder, r=100000)

    def nan_weights():
        def f(t):
            k = next(k for k in t if "lora_B" in k)
            t[k][0, 0] = float("nan")
        _edit_weights(folder, f)

    def inf_weights():
        def f(t):
            k = next(k for k in t if "lora_A" in k)
            t[k][0, 0] = float("inf")
        _edit_weights(folder, f)

    def pickle_weights():
        sentinel = tmp_path / "unpickled"
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        (folder / "adapter_model.safetensors").unlink()
        # a pickle that would create a file if it were ever loaded
        payload = pickle.dumps((tensors, _Boom(str(sentinel))))
        (folder / "adapter_model.bin").write_bytes(payload)

    def garbage_weights():
        (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 64)

    return {
        "missing config": (missing_config, E.AdapterConfigError, "ok"),
        "unparsable config": (unparsable_config, E.AdapterConfigError, "ok"),
        "wrong base": (wrong_base, E.WrongBaseModelError, "ok"),
        "absent target": (absent_target, E.TargetModuleError, "ok"),
        "bad shape": (bad_shape, E.ShapeMismatchError, "ok"),
        "rank zero": (rank_zero, E.RankError, "ok"),
        "rank huge": (rank_huge, E.RankError, "ok"),
        "nan": (nan_weights, E.NonFiniteWeightsError, "ok"),
        "inf": (inf_weights, E.NonFiniteWeightsError, "ok"),
        "pickle": (pickle_weights, E.UnsafeFormatError, "ok"),
        "garbage safetensors": (garbage_weights, E.AdapterWeightsError, "ok"),
        "slash in name": (lambda: None, E.InvalidNameError, "a/b"),
        "dotdot in name": (lambda: None, E.InvalidNameError, "..evil"),
        "control char in name": (lambda: None, E.InvalidNameError, "bad\x07name"),
        "newline in name": (lambda: None, E.InvalidNameError, "bad\nname"),
        "reserved name": (lambda: None, E.InvalidNameError, "auto"),
        "name taken": (lambda: None, E.NameTakenError, "taken"),
    }


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# case -> (words naming the problem, words saying what to do), matched case-insensitively
MESSAGES = {
    "missing config": ("has no adapter_config.json", "save_pretrained"),
    "unparsable config": ("adapter_config.json is not valid json", "re-save the adapter"),
    "wrong base": ("trained on 'meta-llama/llama-3.1-8b'", "train the adapter on tiny/llama"),
    "absent target": ("['w_pack'] do not exist", "train the adapter with target_modules from"),
    "bad shape": ("q_proj", "train it on tiny/llama"),
    "rank zero": ("r=0 is out of range", "retrain the adapter with a rank in that range"),
    "rank huge": ("r=100000 is out of range", "retrain the adapter with a rank in that range"),
    "nan": ("nan or inf", "retrain it"),
    "inf": ("nan or inf", "retrain it"),
    "pickle": ("adapter_model.bin is a pickle", "safe_serialization=true"),
    "garbage safetensors": ("not a readable safetensors file", "safe_serialization=true"),
    "slash in name": ("'a/b' contains a path separator", "use letters, digits"),
    "dotdot in name": ("'..evil' contains a path separator or '..'", "use letters, digits"),
    "control char in name": ("contains control characters", "use printable letters"),
    "newline in name": ("contains control characters", "use printable letters"),
    "reserved name": ("'auto' is reserved", "choose another"),
    "name taken": ("'taken' already exists", "choose another name"),
}

CASES = ["missing config", "unparsable config", "wrong base", "absent target", "bad shape", "rank zero",
         "rank huge", "nan", "inf", "pickle", "garbage safetensors", "slash in name", "dotdot in name",
         "control char in name", "newline in name", "reserved name", "name taken"]


@pytest.mark.parametrize("case", CASES)
def test_bad_adapter_is_refused_with_message_and_pool_unchanged(case, tmp_path, tiny_base, tiny_pool):
    good = make_lora(tiny_base, tmp_path / "good", base_name="tiny/llama", seed=1)
    tiny_pool.register_lora(good, "taken", "already here")
    folder = tmp_path / "bad"
    shutil.copytree(good, folder)
    mutate, error, name = _bad_inputs(folder, tmp_path, tiny_base)[case]
    mutate()
    before = tree_snapshot(tiny_pool.root)
    with pytest.raises(error) as info:
        tiny_pool.register_lora(folder, name, "a bad one")
    problem, remedy = MESSAGES[case]
    assert problem in info.value.message.lower(), info.value.message
    assert remedy in info.value.message.lower(), info.value.message
    assert tree_snapshot(tiny_pool.root) == before
    assert tiny_pool.names() == ["taken"]
    assert not (tmp_path / "unpickled").exists()


def test_oversized_file_is_refused(tmp_path, tiny_spec, tiny_adapter, embedder):
    root = tmp_path / "p"
    pool = ExpertPool(root, f"sqlite:///{root}/r.sqlite", tiny_spec, embed=embedder.encode, max_upload_bytes=1000)
    before = tree_snapshot(root)
    with pytest.raises(E.UploadTooLargeError, match="over the limit"):
        pool.register_lora(tiny_adapter, "big", "too big")
    assert tree_snapshot(root) == before


@pytest.mark.parametrize("kwargs, error", [
    ({"model": "openai/x"}, E.InvalidModelExpertError),                       # no api_base
    ({"model": "openai/x", "api_base": "ftp://host"}, E.InvalidModelExpertError),
    ({"model": "openai/x", "api_base": "http://h/v1", "api_key_env": "sk-123 secret"}, E.InvalidModelExpertError),
    ({}, E.InvalidModelExpertError),
])
def test_bad_model_expert_is_refused(tiny_pool, kwargs, error):
    with pytest.raises(error):
        tiny_pool.register_model("remote", "a remote model", **kwargs)
    assert tiny_pool.names() == []


def test_model_expert_local_folder_and_litellm_string(tiny_pool, tiny_base, tmp_path):
    card = tiny_pool.register_model("local", "a local model", path=tiny_base)
    assert card.kind == "model" and card.extra["path"] == str(tiny_base.resolve())
    card = tiny_pool.register_model("remote", "served elsewhere", model="openai/smol",
                                    api_base="http://127.0.0.1:9/v1", api_key_env="REMOTE_KEY")
    assert card.api_base == "http://127.0.0.1:9/v1"
    (tmp_path / "notmodel").mkdir()
    with pytest.raises(E.InvalidModelExpertError):
        tiny_pool.register_model("bad", "x", path=tmp_path / "notmodel")
    pick = tmp_path / "pickled"
    pick.mkdir()
    (pick / "config.json").write_text('{"model_type": "llama"}')
    (pick / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(E.UnsafeFormatError):
        tiny_pool.register_model("bad", "x", path=pick)


def test_unknown_expert_raises_not_found(tiny_pool):
    with pytest.raises(E.UnknownExpertError):
        tiny_pool.get("nope")
    with pytest.raises(E.UnknownExpertError):
        tiny_pool.remove("nope")
