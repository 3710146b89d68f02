"""A tiny Llama with a character tokenizer that has a ChatML chat template, for chat-template and context tests."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from opd.models.prompts import prompt_ids
from opd.protocol import Trajectory

DEFAULT_SYSTEM = "Be brief."
# ChatML as SmolLM2 writes it: a default system turn when the conversation has none, each turn ended by <|im_end|>
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chatml_tokenizer(eos: str = "<|im_end|>") -> PreTrainedTokenizerFast:
    """Characters one by one plus ChatML's two special tokens; `eos` may be the end-of-turn token (as SmolLM2's
    is) or a separate `</s>` (as Llama 3's `<|end_of_text|>` is separate from `<|eot_id|>`)."""
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.ascii_letters + string.digits + " \n+=?.,!"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<|im_start|>", eos_token=eos
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "</s>"]})
    fast.chat_template = CHATML
    return fast


def chatml_model_dir(path: Path, eos: str = "<|im_end|>", seed: int = 0) -> Path:
    """A random 2-layer Llama (grouped-query attention, as SmolLM2) and its ChatML tokenizer, saved to `path`."""
    return llama_dir(path, chatml_tokenizer(eos), seed)


def llama_dir(path: Path, tok: PreTrainedTokenizerFast, seed: int = 0) -> Path:
    """A random 2-layer Llama (grouped-query attention) over `tok`'s vocabulary, saved with `tok` to `path`."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def chat_trajectory(tok, problem, response: list[int], index: int) -> Trajectory:
    """One trajectory as the actor sends it: the problem's prompt rendered as the actor renders it (chat template
    where the tokenizer has one), `response` as the sampled ids; behaviour logprobs are zero (tests of scoring)."""
    return Trajectory(
        run_id="r",
        prompt_id=problem.prompt_id,
        group_id=f"g{index}",
        sample_index=0,
        prompt_token_ids=np.asarray(prompt_ids(tok, problem), dtype=np.int32),
        response_token_ids=np.asarray(response, dtype=np.int32),
        behaviour_logprobs=np.zeros(len(response), dtype=np.float32),
        policy_version=0,
    )
