"""Loading student and teacher models and their tokenizer, the same way in every process.

Tiny models are resolved to the directories `opd.models.builds` builds; pretrained ones load by hub id or local path
through the standard Hugging Face calls, so a real checkpoint works the same as the demo's.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from opd.models.vocab import set_real_vocab
from opd.tasks import ADDITION_ALPHABET

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
hf_logging.disable_progress_bar()  # per-file loading bars would flood every component's log
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_char_tokenizer(alphabet: str = ADDITION_ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer built locally with `tokenizers` (nothing is downloaded)."""
    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials + list(alphabet))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return _tiny_fast(tok)


def build_bpe_tokenizer(
    corpus: Iterable[str], vocab_size: int, alphabet: str = ADDITION_ALPHABET
) -> PreTrainedTokenizerFast:
    """A byte-pair tokenizer trained locally on `corpus`: the tiny teacher of another tokenizer than the character
    student's (issue 19), with the char tokenizer's special tokens and roles so only the splitting differs.

    Every character of `alphabet` is in the initial vocabulary whether the corpus has it or not, so any text the
    character student can write encodes with no unknown token, and tokens are pieces of the text itself (no
    word-boundary marks) joined back with nothing between them: decode(encode(text)) == text. Digit runs are split
    from the other characters before merging, so merges are numbers or parts of them (`12`, `10`) and never glue
    an operator to a digit: the habit token `=` stays one token. Training is deterministic (ties between equally
    frequent pairs go by id, not by thread timing), so a corpus and a size give the same tokenizer.json anywhere.
    Fewer than `vocab_size` tokens come out when the corpus has no more pairs to merge."""
    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Digits(individual_digits=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,  # ids 0-3 in the char tokenizer's order
        initial_alphabet=sorted(set(alphabet)),
        min_frequency=0,
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return _tiny_fast(tok)


def _tiny_fast(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """A tiny model's tokenizer as transformers uses it: tokens concatenated with nothing between them (the text's
    own characters, no spaces added), the special tokens by role, BOS added by the usual call like a real model's."""
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.add_bos_token = True
    return fast


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerFast:
    tok = AutoTokenizer.from_pretrained(str(name_or_path))
    if tok.pad_token_id is None:
        # Padding never reaches a loss (it is masked), so any id works; EOS is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str | Path, dtype: str = "float32", device: str = "cpu") -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=_DTYPES[dtype])
    return model.to(device)


def load_model(
    name_or_path: str | Path, tokenizer: str | Path, dtype: str = "float32", device: str = "cpu"
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A model and its tokenizer, with the model's real vocabulary computed once and kept on it
    (opd.models.vocab): padded embedding rows are excluded from every distribution computed from it."""
    model, tok = load_causal_lm(name_or_path, dtype, device), load_tokenizer(tokenizer)
    set_real_vocab(model, tok)
    return model, tok


def encode_prompt(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """Prompt ids with BOS, the way every component tokenises (teachers never see text)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def check_same_vocabulary(
    student_tok: PreTrainedTokenizerFast,
    teacher_tok: PreTrainedTokenizerFast,
    names: tuple[str, str] | None = None,
) -> None:
    """Refuse to score when ids would mean different strings to student and teacher.

    Only the tokenizers are compared, never the models' embedding sizes: two models of one tokenizer family with
    differently padded embeddings (Qwen2.5's 151,936 and 152,064 rows) share every real id, and the padding rows
    are excluded from every distribution (opd.models.vocab). `names` say which models the tokenizers belong to."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    who = f"student {names[0]} and teacher {names[1]}" if names else "student and teacher"
    between = f"between {who}"
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))[:5]
        only_t = sorted(set(tv) - set(sv))[:5]
        moved = sorted(k for k in set(sv) & set(tv) if sv[k] != tv[k])[:5]
        raise ValueError(
            f"tokenizers differ {between}, so token ids would mean different text: "
            f"{len(sv)} vs {len(tv)} entries; only in student {only_s}, only in teacher {only_t}, "
            f"different ids for {moved}. Use a teacher from the student's tokenizer family (embedding sizes may "
            "differ), or declare the teacher `tokenizer: different` (teachers.<name>.tokenizer, or "
            "scorer.tokenizer) to score it by aligned text (README: Teachers with another tokenizer)."
        )
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(student_tok, name) != getattr(teacher_tok, name):
            raise ValueError(
                f"the tokenizers of {who} disagree on {name}: "
                f"{getattr(student_tok, name)} vs {getattr(teacher_tok, name)}; use one model family, or declare "
                "the teacher `tokenizer: different`"
            )
    if getattr(student_tok, "chat_template", None) != getattr(teacher_tok, "chat_template", None):
        raise ValueError(
            f"the tokenizers of {who} have different chat templates; use one model family, or declare the "
            "teacher `tokenizer: different`"
        )


def sft_optimizer(model: torch.nn.Module, lr: float, steps: int):
    """(AdamW, schedule) of the tiny models' SFT (text and vision-language alike): a 50-step linear warmup, then
    linear decay to 5% of `lr` at `steps`."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / max(1, steps))
    )
    return opt, sched
