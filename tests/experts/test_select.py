"""`moerge experts choose`: a retrained expert replaces the library's only when it does better on
development sets (training templates, training content), and the swap never leaves a half expert."""
from __future__ import annotations

import json
import shutil

import pytest

from moerge.experts.bundled import LIBRARY
from moerge.experts.select import FILES, SELECT_SEED, choose
from tests.helpers import make_lora, tree_snapshot

BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.real
@pytest.mark.slow
def test_the_better_expert_on_dev_sets_wins_and_is_installed_whole(tmp_path, base_model_dir):
    # a "library" whose km_to_m expert is a near-zero random LoRA (it answers as the base model does)
    library, weak = tmp_path / "library", tmp_path / "library" / "km_to_m"
    make_lora(base_model_dir, weak, base_name=BASE_ID, scale_b=1e-4)
    (weak / "manifest.json").write_text("{}\n")
    (weak / "gate.safetensors").write_bytes(b"old gate")
    # candidates: the real km_to_m expert, and a copy of the weak one under another task's name is refused
    cands = tmp_path / "cands"
    shutil.copytree(LIBRARY / "km_to_m", cands / "km_to_m", ignore=shutil.ignore_patterns("*.tmp"))
    before = tree_snapshot(library)
    kept = choose(base_model_dir, library, cands, install=False, n=8, log=lambda m: None)
    assert tree_snapshot(library) == before                       # without --install nothing moves
    [d] = kept
    assert d["replace"] and d["dev"]["seed"] == SELECT_SEED and d["dev"]["split"] == "train"
    assert min(d["candidate_dev"].values()) > max(d["incumbent_dev"].values())
    assert json.loads((cands / "km_to_m" / "manifest.json").read_text())["selection"] == d

    [d] = choose(base_model_dir, library, cands, install=True, n=8, log=lambda m: None)
    assert d["replace"]
    for f in FILES:
        assert (library / "km_to_m" / f).read_bytes() == (cands / "km_to_m" / f).read_bytes(), f
    assert sorted(p.name for p in library.iterdir()) == ["km_to_m"]          # no staging folders left

    # now the incumbent is the real expert: the same expert again is no improvement, so it stays
    [d] = choose(base_model_dir, library, cands, install=True, n=8, log=lambda m: None)
    assert not d["replace"] and d["candidate_dev"] == d["incumbent_dev"]


@pytest.mark.real
def test_a_candidate_for_a_task_the_library_lacks_is_refused(tmp_path, base_model_dir):
    (tmp_path / "lib").mkdir()
    (tmp_path / "cands" / "km_to_m").mkdir(parents=True)
    (tmp_path / "cands" / "km_to_m" / "gate.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="no such expert"):
        choose(base_model_dir, tmp_path / "lib", tmp_path / "cands", log=lambda m: None)


@pytest.mark.real
def test_build_rebuilds_each_expert_in_its_recorded_recipe_and_skips_the_committed_library(tmp_path, base_model_dir):
    """`moerge experts build` on the committed library trains nothing: every manifest's fingerprint is
    the config of the recipe it records (a mixed library: some experts content-pools-v1, some not)."""
    from dataclasses import replace

    from moerge.experts.build import build_library, default_config, recorded_config, recorded_recipe
    from moerge.tasks import HELD_IN
    lib = tmp_path / "library"
    shutil.copytree(LIBRARY, lib)
    recipes = {t: recorded_recipe(lib / t) for t in HELD_IN}
    assert set(recipes.values()) <= {"template-lists-v0", "content-pools-v1"}
    # an expert trained with another step budget than its task's default (`experts build --steps`) is
    # rebuilt with the budget its manifest records: up to date here, not retrained at the default
    m = json.loads((lib / "km_to_m" / "manifest.json").read_text())
    cfg = recorded_config(lib / "km_to_m")
    assert cfg is not None and cfg.fingerprint() == m["fingerprint"]
    m["config"]["steps"] = cfg.steps + 500
    m["fingerprint"] = replace(cfg, steps=cfg.steps + 500).fingerprint()
    assert m["fingerprint"] != default_config("km_to_m", recipes["km_to_m"]).fingerprint()
    (lib / "km_to_m" / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    before = tree_snapshot(lib)
    logs: list[str] = []
    build_library(base_model_dir, lib, log=logs.append)
    assert logs == [f"{t}: up to date, skipped" for t in HELD_IN]
    assert tree_snapshot(lib) == before
    with pytest.raises(ValueError, match="unknown data recipe"):
        build_library(base_model_dir, lib, log=logs.append, data="everything")
    with pytest.raises(ValueError, match="name a recipe"):
        build_library(base_model_dir, lib, log=logs.append, steps=10)
    assert tree_snapshot(lib) == before


def test_content_dev_prompts_are_only_those_with_content_training_never_saw(tmp_path):
    """capital_of's training pool is ~125 countries and training covers them all: no development prompt
    with unseen content is left, so the content skill cannot be judged there (and the incumbent stays);
    km_to_m's distances are many, and most development prompts are new to training."""
    from dataclasses import asdict

    from moerge.experts.build import default_config
    from moerge.experts.select import dev_sets, trained_content
    sizes = {}
    for task in ("capital_of", "km_to_m"):
        cfg = default_config(task, "content-pools-v1")
        (tmp_path / task).mkdir()
        (tmp_path / task / "manifest.json").write_text(json.dumps({"config": {**asdict(cfg), "targets": list(cfg.targets)}}))
        seen = trained_content(tmp_path / task)
        sets = dev_sets(task, seen, 48)
        assert all(not set(s.content) <= seen for s in sets["content-pools-v1"])
        assert len(sets["template-lists-v0"]) == 48
        sizes[task] = len(sets["content-pools-v1"])
    assert sizes == {"capital_of": 0, "km_to_m": 48}


def test_content_dev_prompts_use_only_the_templates_both_recipes_train_on():
    """content-pools-v1 trains on the hand-written templates plus a generated family; template-lists-v0
    on the hand-written ones only. The content development set uses the hand-written ones, so it does not
    favour the candidate by its own phrasings; every one of them still appears."""
    from moerge.experts.select import DRAW, dev_sets
    from moerge.tasks import get_task
    for task in ("arith_mul", "uppercase", "number_to_words"):
        t = get_task(task)
        assert len(t.family_templates) > len(t.train_templates)          # there is a family to leave out
        content = dev_sets(task, set(), 48)["content-pools-v1"]
        assert len(content) == 48
        assert {s.prompt for s in content} <= {
            s.prompt for s in t.samples(DRAW, SELECT_SEED, "train", "content")}    # the same generator and seed
        assert all(s.template < len(t.train_templates) for s in content)
        assert len({s.template for s in content}) >= len(t.train_templates) - 2
