"""Which `name_or_path` values mean a model of the cache (`opd models get`), a GGUF file, or something else."""

from __future__ import annotations

from opd.config.models import MODEL_CATALOG, is_gguf, named_model_dir


def test_catalog_names_mean_the_cache_directory_fetched_or_not(tmp_path):
    assert named_model_dir("smollm2-135m-instruct", tmp_path) == tmp_path / "models" / "smollm2-135m-instruct"
    assert set(MODEL_CATALOG) == {"smollm2-135m-instruct"}
    entry = MODEL_CATALOG["smollm2-135m-instruct"]
    assert entry.member.endswith(".gguf") and len(entry.sha256) == 64 and entry.requirement.count("==") == 1


def test_own_names_only_once_made_and_paths_hub_ids_and_ggufs_never(tmp_path):
    assert (
        named_model_dir("mymodel", tmp_path) is None
    )  # a hub id such as `gpt2` until `opd models get mymodel`
    (tmp_path / "models" / "mymodel").mkdir(parents=True)
    assert named_model_dir("mymodel", tmp_path) == tmp_path / "models" / "mymodel"
    for other in ("org/mymodel", "./mymodel", "~/mymodel", "/abs/mymodel", "mymodel.gguf", ""):
        assert named_model_dir(other, tmp_path) is None, other
    assert (
        is_gguf("x/SmolLM2.Q4_1.GGUF")
        and is_gguf("a.gguf")
        and not is_gguf("gguf")
        and not is_gguf("a.gguf/b")
    )
