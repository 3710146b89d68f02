"""Hand-made pairs of tokenizers for the cross-tokenizer tests, built locally with `tokenizers` (no download):
the demo's character tokenizer, a BPE over the same alphabet whose merges make multi-character tokens, a
character tokenizer over any alphabet, and a byte-level BPE whose tokens can end inside a UTF-8 character."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from opd.models.loading import SPECIAL_TOKENS, build_char_tokenizer

SPECIALS = list(SPECIAL_TOKENS.values())


def char_tokenizer(alphabet: str | None = None) -> PreTrainedTokenizerFast:
    return build_char_tokenizer() if alphabet is None else build_char_tokenizer(alphabet)


def bpe_tokenizer(corpus: list[str], vocab_size: int, alphabet: str) -> PreTrainedTokenizerFast:
    """A BPE with every character of `alphabet` in its base vocabulary (no unk over it), tokens concatenated on
    decode."""
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=list(alphabet), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.add_bos_token = True
    return fast


def _byte_level(corpus: list[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def byte_level_bpe(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE: a character outside its merges is several byte tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_byte_level(corpus, vocab_size, SPECIALS), **SPECIAL_TOKENS
    )


ADDITION_CORPUS = [f"{a}+{b}={a + b}" for a in range(0, 200, 7) for b in range(0, 150, 11)]


# A Llama-3-like template: header tokens around each role, every turn closed by <|eot_id|>
LLAMA3ISH = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA3ISH_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def llama3ish_tokenizer(corpus: list[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE with a Llama-3-like chat template: another family than tests/chat_models.py's ChatML one
    (other specials, other template, other merges), for cross-tokenizer chat tests."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level(corpus, vocab_size, LLAMA3ISH_SPECIALS),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
    )
    fast.add_special_tokens({"additional_special_tokens": LLAMA3ISH_SPECIALS[2:]})
    fast.chat_template = LLAMA3ISH
    return fast
