"""The tiny models' BPE tokenizer (issue 19's teacher of another tokenizer): it writes back exactly the text it read,
over every string the character student can write; it is the same bytes every time it is trained on the same
text; it really merges (else the cross-tokenizer demo would align one character to one token and test nothing);
and it names its models apart from the character ones while the character recipes stay those shipped."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from opd.config import TinyModel, TinyVlmModel, load_config
from opd.models.builds import (
    ASSET_FORMAT,
    _digest,
    bpe_corpus,
    recipe,
    shipped_manifest,
    tokenizer_recipe,
)
from opd.models.loading import SPECIAL_TOKENS, build_bpe_tokenizer, build_char_tokenizer
from opd.tasks import ADDITION_ALPHABET
from tests.conftest import TINY


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY, ["teacher.tokenizer=bpe", "scorer.tokenizer=different"])


@pytest.fixture(scope="module")
def bpe(cfg):
    return build_bpe_tokenizer(bpe_corpus(cfg), cfg.teacher.bpe_vocab_size, ADDITION_ALPHABET)


def _pieces(tok, text: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])


def test_round_trip_over_random_alphabet_strings(bpe):
    """Any text the character student writes (answers, its trailing `=` habit, nonsense) comes back exactly, with
    no unknown token: the cross-tokenizer scorer re-tokenises the student's text with this tokenizer."""
    rng = random.Random(0)
    texts = ["", "=", "+", "57=", "==", "0000", "199+99=198"]
    texts += ["".join(rng.choice(ADDITION_ALPHABET) for _ in range(rng.randint(1, 40))) for _ in range(500)]
    for text in texts:
        ids = bpe(text, add_special_tokens=False)["input_ids"]
        assert bpe.unk_token_id not in ids, text
        assert bpe.decode(ids) == text
        assert "".join(_pieces(bpe, text)) == text  # tokens are pieces of the text, no boundary marks


def test_alphabet_characters_absent_from_the_corpus_still_encode():
    """The initial alphabet, not the corpus, decides what can be written: a corpus without `+` or `=` still gives
    a tokenizer that writes them as themselves."""
    tok = build_bpe_tokenizer(["1234", "5678", "90"] * 50, 40, ADDITION_ALPHABET)
    vocab = tok.get_vocab()
    assert set(ADDITION_ALPHABET) <= set(vocab)
    ids = tok("12+34=", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == "12+34="


def test_special_tokens_have_the_char_tokenizers_strings_and_roles(bpe):
    char = build_char_tokenizer()
    for role, text in SPECIAL_TOKENS.items():
        assert getattr(bpe, role) == getattr(char, role) == text
    assert [bpe.pad_token_id, bpe.bos_token_id, bpe.eos_token_id, bpe.unk_token_id] == [0, 1, 2, 3]
    assert bpe("12")["input_ids"][0] == bpe.bos_token_id  # BOS added by the usual call, like the char one
    assert (
        bpe.decode(
            [bpe.bos_token_id, *bpe("7", add_special_tokens=False)["input_ids"]], skip_special_tokens=True
        )
        == "7"
    )


def test_training_is_deterministic(cfg, tmp_path):
    """Same corpus and size, same tokenizer.json bytes: the file is part of every shipped BPE model's digest."""
    corpus = bpe_corpus(cfg)
    for name in ("a", "b"):
        build_bpe_tokenizer(corpus, 64, ADDITION_ALPHABET).save_pretrained(tmp_path / name)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()


def test_tiny_yaml_merges_are_the_recorded_ones(bpe):
    """The merges of tiny.yaml's corpus, in order, as trained when this was written (one thread or many, checked
    by hand with RAYON_NUM_THREADS=1 and TOKENIZERS_PARALLELISM=false): another machine, thread count or
    `tokenizers` release that merges otherwise would rebuild every BPE model differently from its recipe."""
    vocab = bpe.get_vocab()
    merged = [t for t in sorted(vocab, key=vocab.get) if len(t) > 1 and t not in SPECIAL_TOKENS.values()]
    assert merged == RECORDED_MERGES


RECORDED_MERGES = "10 12 14 13 11 15 17 16 18 95 94 84 75 69 86 91".split()


def test_merges_form_multi_digit_tokens_and_never_glue_an_operator(bpe, cfg):
    vocab = bpe.get_vocab()
    assert len(vocab) == cfg.teacher.bpe_vocab_size
    merged = [t for t in vocab if t not in SPECIAL_TOKENS.values() and len(t) > 1]
    assert len(merged) == len(vocab) - len(SPECIAL_TOKENS) - len(set(ADDITION_ALPHABET))
    assert all(t.isdigit() for t in merged), merged  # the habit `=` stays one token
    # the corpus's numbers merge, so a prompt takes fewer tokens than characters
    assert len(_pieces(bpe, "12+34=")) < len("12+34=")
    assert _pieces(bpe, "57=")[-1] == "="


def test_bpe_recipe_differs_and_char_recipes_stay_the_shipped_ones(cfg):
    """Adding the tokenizer fields renames no character model: every shipped model's recipe fields come back
    unchanged from its spec, and naming `tokenizer: bpe` gives another model and another tokenizer."""
    manifest = shipped_manifest()
    assert manifest
    for name, entry in manifest.items():
        fields = entry["recipe"][2]
        if fields.get("kind") == "tiny_vlm":  # the vision-language models: their own kind and recipe
            assert TinyVlmModel(**fields).recipe_fields() == fields, name
            assert _digest(entry["recipe"]) == name.rsplit("-", 1)[1]
            continue
        assert TinyModel(**fields).recipe_fields() == fields, name
        assert _digest(entry["recipe"]) == name.split("-", 1)[1]
    char = cfg.teacher.model_copy(update={"tokenizer": "char"})
    bpe = cfg.teacher
    assert "tokenizer" not in char.recipe_fields() and "bpe_vocab_size" not in char.recipe_fields()
    assert _digest(recipe("teacher", char, cfg)) in {
        n.split("-", 1)[1] for n in manifest
    }  # tiny.yaml's teacher
    assert recipe("teacher", bpe, cfg) != recipe("teacher", char, cfg)
    bigger = bpe.model_copy(update={"bpe_vocab_size": 128})
    assert _digest(recipe("teacher", bigger, cfg)) != _digest(recipe("teacher", bpe, cfg))
    assert tokenizer_recipe(char, cfg) == [
        ASSET_FORMAT,
        ADDITION_ALPHABET,
    ]  # the cached char tokenizer's name
    assert tokenizer_recipe(bigger, cfg) != tokenizer_recipe(bpe, cfg) != tokenizer_recipe(char, cfg)
    assert [m.tokenizer_id() for m in (char, bpe, bigger)] == ["char", "bpe-32", "bpe-128"]


def test_bpe_vocab_size_bounds_name_the_field():
    with pytest.raises(ValueError, match="bpe_vocab_size"):
        TinyModel(tokenizer="bpe", bpe_vocab_size=8)
    with pytest.raises(ValueError, match="tokenizer"):
        TinyModel(tokenizer="wordpiece")


def test_tiny_bpe_models_are_built_with_the_bpe_tokenizer(tmp_path):
    """A real (very small) build: the model's embedding has one row per BPE token, the saved tokenizer is the
    BPE one, and a BPE student and a BPE teacher of one size share one cached tokenizer (their ids agree)."""
    from transformers import AutoConfig

    from opd.models.builds import ensure_assets
    from opd.models.loading import load_tokenizer

    small = {"hidden_size": 8, "num_layers": 1, "num_heads": 2, "intermediate_size": 8, "sft_batch_size": 4}
    over = [f"run.cache_dir={tmp_path}", "task.eval_size=4", "task.max_digits=2"]
    over += [f"{role}.{k}={v}" for role in ("student", "teacher") for k, v in small.items()]
    over += ["student.sft_steps=2", "teacher.sft_steps=0", "student.tokenizer=bpe", "teacher.tokenizer=bpe"]
    assets = ensure_assets(load_config(TINY, over), log=lambda _: None)
    tok_dirs = sorted(p.name for p in Path(tmp_path).iterdir() if p.name.startswith("tokenizer-"))
    assert len(tok_dirs) == 1 and tok_dirs[0].startswith("tokenizer-bpe-")
    for asset in (assets.student, assets.teacher):
        tok = load_tokenizer(asset.tokenizer)
        assert AutoConfig.from_pretrained(asset.path).vocab_size == len(tok) == 32
        assert any(len(t) > 1 and t.isdigit() for t in tok.get_vocab())
        spec = json.loads((Path(asset.path) / "opd_asset.json").read_text())["spec"]
        assert spec["tokenizer"] == "bpe" and spec["bpe_vocab_size"] == 32
    assert (Path(assets.student.path) / "tokenizer.json").read_bytes() == (
        Path(assets.teacher.path) / "tokenizer.json"
    ).read_bytes()
