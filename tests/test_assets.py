"""Model assets are built from PyPI packages, checksummed, and a second run is a no-op."""

from __future__ import annotations

import json
import pytest

from moerge.assets import MARKER, ensure_assets, tree_digest


@pytest.mark.real
def test_assets_are_idempotent_with_checksum(real_settings):
    first = ensure_assets(real_settings)
    marker = json.loads((first.base_model / MARKER).read_text())
    assert marker["digest"] == tree_digest(first.base_model)
    mtime = (first.base_model / "model.safetensors").stat().st_mtime
    again = ensure_assets(real_settings)
    assert again == first
    assert (first.base_model / "model.safetensors").stat().st_mtime == mtime  # not rebuilt
    assert (first.embedder / "modules.json").exists()


@pytest.mark.real
def test_corrupted_base_model_is_rebuilt(real_settings, tmp_path):
    from moerge.config import Settings
    s = Settings(home=tmp_path / "home", bundled_pool=False)
    built = ensure_assets(s).base_model
    (built / "config.json").write_text("{}")
    rebuilt = ensure_assets(s).base_model
    assert json.loads((rebuilt / "config.json").read_text())["model_type"] == "llama"
