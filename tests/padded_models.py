"""Tiny Llamas of one tokenizer whose embeddings are padded to different sizes, with large logits on the padding
rows on purpose: a distribution that forgets to exclude them is dominated by ids no tokenizer produces."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opd.models.loading import build_char_tokenizer

V = 17  # the tokenizer's ids: 16 characters and specials, plus one added special token
PADDING_SCALE = 40.0


def padded_tokenizer(alphabet: str | None = None):
    """The char tokenizer with an added special token, so `vocab_size` (16) misses one real id."""
    tok = build_char_tokenizer(alphabet) if alphabet else build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    return tok


def save_padded(path, tok, seed: int, rows: int, *, resize: bool, hidden: int = 16, heads: int = 2) -> str:
    """A tiny Llama of `tok` with `rows` embedding rows, saved with its tokenizer at `path`: built with that
    vocab_size, or (`resize`) built with the tokenizer's size and resized with `pad_to_multiple_of=rows`."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok) if resize else rows,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    if resize:
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=rows)
    assert model.get_output_embeddings().weight.shape[0] == rows
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[len(tok) :] = torch.randn_like(head[len(tok) :]) * PADDING_SCALE
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
