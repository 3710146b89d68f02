"""The shipped demo models: each is what its manifest says (recipe, recipe hash, file hashes), and the built-in
configs find theirs without building anything."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from opd.config import load_config
from opd.models.builds import (
    SHIPPED,
    ModelAsset,
    asset_name,
    compare_with_shipped,
    ensure_assets,
    file_digests,
    shipped_manifest,
)
from tests.conftest import REPO

# every built-in config whose tiny models ship (their teacher and student recipes are in the manifest)
SHIPPED_CONFIGS = (
    "tiny.yaml",
    "compose.yaml",
    "redis.yaml",
    "reference.yaml",
    "bench_quality.yaml",
    "bench_quality_skill.yaml",
    "tiny_vlm.yaml",
    "tiny_vlm_jsonl.yaml",  # its JSONL files are read at launch, not at load: the models are found without them
)


def test_manifest_matches_the_shipped_files():
    manifest = shipped_manifest()
    assert manifest, f"no {SHIPPED}/manifest.json"
    assert {p.name for p in SHIPPED.iterdir() if p.is_dir()} == set(manifest)
    for name, entry in manifest.items():
        # the recipe named in the manifest made this model: `<role>-<digest>`, a tiny VLM's `<role>-vlm-<digest>`
        assert name == asset_name(entry["recipe"])
        blob = json.dumps(entry["recipe"], sort_keys=True, default=str).encode()
        assert entry["recipe_sha256"] == hashlib.sha256(blob).hexdigest()
        assert file_digests(SHIPPED / name) == entry["files"], f"{name} differs from its manifest"
        assert {"model.safetensors", "config.json", "tokenizer.json", "opd_asset.json"} <= set(entry["files"])
        if entry["recipe"][2]["kind"] == "tiny_vlm":  # a tiny VLM loads with its processor (opd.models.vlm)
            assert "processor_config.json" in entry["files"], name


@pytest.mark.parametrize("config", SHIPPED_CONFIGS)
def test_builtin_config_uses_shipped_models_without_building(config, tmp_path):
    cfg = load_config(REPO / "configs" / config, [f"run.cache_dir={tmp_path}"])
    built = []
    assets = ensure_assets(cfg, log=built.append)
    assert built == []
    for asset in (assets.teacher, assets.student):
        assert asset.path.startswith(str(SHIPPED)), asset.path
        assert asset.eval_accuracy is not None
    assert list(tmp_path.iterdir()) == []  # not even a tokenizer: a shipped model carries its own


def test_compare_with_shipped_tells_identical_from_different(tmp_path):
    name = next(iter(shipped_manifest()))
    copy = tmp_path / name
    shutil.copytree(SHIPPED / name, copy)
    asset = ModelAsset(path=str(copy), tokenizer=str(copy), dtype="float32")
    assert compare_with_shipped(asset) == "identical to"
    weights = copy / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(blob))
    assert compare_with_shipped(asset) == "DIFFERENT from"
    unshipped = tmp_path / "student-000000000000"
    shutil.copytree(SHIPPED / name, unshipped)
    assert compare_with_shipped(ModelAsset(str(unshipped), str(unshipped), "float32")) is None
