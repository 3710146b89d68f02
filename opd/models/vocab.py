"""The real vocabulary of a model: the ids its tokenizer can produce, not the rows its embedding happens to have.

Models of one tokenizer family often have embedding matrices of different sizes: Qwen2.5's tokenizer has 151,665
ids (`len(tokenizer)`: 151,643 base tokens plus 22 added special tokens such as `<|im_end|>`), while its
checkpoints have 151,936 or 152,064 embedding rows depending on the model's size; the rows beyond the tokenizer
are padding for efficient matmuls and tensor-parallel splits (QwenLM/Qwen3 #29, #292; torchtune #2119, #2416). SmolLM2's 49,152
ids fill its 49,152 rows exactly. `tokenizer.vocab_size` is not the answer: transformers documents it as the base
vocabulary *without* the added tokens (151,643 for Qwen, which would refuse its own end-of-turn token);
`len(tokenizer)` counts the added ones. We take one more than the largest id `get_vocab()` holds (base and added
tokens), which equals `len(tokenizer)` when the ids are contiguous and still covers a tokenizer with holes.

A padding row was never a training target, but its logit is whatever the weights make it: unless excluded, it
takes probability mass, differently in each model (the teacher's 152,064 rows and the student's 151,936 are not
even the same distribution's support). So every distribution we compute is over the real ids only: logits are cut
to the first `V` columns before the log-softmax, which is the model's distribution conditioned on emitting a real
token (p(i) / sum_{j<V} p(j)), renormalised over the real ids. Teacher logprobs, its top-k and tail, the actor's
behaviour logprobs and the learner's logprobs all use that one support, so the ratio s - b and the KL terms
compare like with like, and no padding id is ever sampled, attached or gathered.

`V` is computed once per model load (`opd.models.loading.load_model`) and kept on the model object
(`real_vocab(model)`), so the code that holds the model (sampler, teacher backend, learner engine) reads it
without a tokenizer; ids outside it are refused where messages are decoded (the components pass it as
`vocab_size`).
"""

from __future__ import annotations

import torch

_ATTR = "_opd_real_vocab"
_NEVER = "_opd_never_sampled"


def tokenizer_vocab(tokenizer) -> int:
    """The bound on the ids `tokenizer` can produce: 1 + its largest id, base vocabulary and added tokens."""
    ids = tokenizer.get_vocab().values()
    return max(max(ids, default=-1) + 1, len(tokenizer))


def embedding_rows(model: torch.nn.Module) -> int:
    """Rows of the output head, i.e. the logits' width (the input embedding's where the model has no head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None:
        weight = model.get_input_embeddings().weight
    # ZeRO-3 keeps the full shape in ds_shape; the learner reads this before the engine shards anyway
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def set_real_vocab(model: torch.nn.Module, tokenizer) -> int:
    """Compute `model`'s real vocabulary from its tokenizer, keep it on the model, and return it.

    It is the tokenizer's id bound, or the model's row count where that is smaller (ids beyond the rows could not
    be fed to it anyway: such an id is refused as outside the vocabulary)."""
    vocab = min(tokenizer_vocab(tokenizer), embedding_rows(model))
    setattr(model, _ATTR, vocab)
    return vocab


def real_vocab(model: torch.nn.Module) -> int:
    """The real vocabulary kept by `set_real_vocab`; the logits' width for a model loaded without a tokenizer."""
    vocab = getattr(model, _ATTR, None)
    return int(vocab) if vocab is not None else embedding_rows(model)


def real_logits(logits: torch.Tensor, vocab: int | None) -> torch.Tensor:
    """`logits` (..., V_rows) cut to the real ids (..., vocab): a view, no copy. A log-softmax of the result is the
    distribution renormalised over the real vocabulary (module docstring)."""
    if vocab is None or logits.shape[-1] <= vocab:
        return logits
    return logits[..., :vocab]


def padding_note(vocab: int) -> str:
    """What an id at or beyond the real vocabulary is, for error messages."""
    return f"ids at or above {vocab} are padded embedding rows beyond the tokenizer's vocabulary"


def padding_reason(token: int, vocab: int) -> str:
    """Why an id at or beyond the real vocabulary is refused, for error messages."""
    return f"token id {token} is not in the tokenizer's vocabulary [0, {vocab}) ({padding_note(vocab)})"


def limit_vllm_vocab(worker, vocab: int) -> int:
    """Run on a vLLM worker through `LLM.collective_rpc(limit_vllm_vocab, args=(vocab,))`: cut the model's logits
    to the first `vocab` columns, inside vLLM's LogitsProcessor, so prompt logprobs and samples are over the real
    vocabulary. vLLM itself cuts only its own tensor-parallel padding (to `org_vocab_size`, which it sets to the
    checkpoint's `vocab_size`, padding rows included); lowering that bound is the same cut, one step earlier.
    Returns the old bound."""
    model = worker.model_runner.get_model()
    # a vision-language model's logits come from its language model's processor
    proc = getattr(model, "logits_processor", None) or model.get_language_model().logits_processor
    old = int(proc.org_vocab_size)
    proc.org_vocab_size = min(int(vocab), old)
    return old


def set_never_sampled(model: torch.nn.Module, ids) -> None:
    """Ids the student never emits in a response (a vision-language model's image placeholder, which a response
    would turn into a slot for image features): kept on the model like its real vocabulary."""
    setattr(model, _NEVER, tuple(int(i) for i in ids))


def never_sampled(model: torch.nn.Module) -> tuple[int, ...]:
    return tuple(getattr(model, _NEVER, ()))


def without_ids(logits: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
    """`logits` with the columns of `ids` at -inf (a copy; the input itself when there are none): a log-softmax
    of the result is the student's distribution renormalised over the ids it may emit. The actor samples from it
    and records its behaviour logprobs, and the learner recomputes them, on that one support (as vLLM does when it
    bans a token), so the importance ratio compares like with like."""
    if not ids:
        return logits
    index = torch.tensor(ids, dtype=torch.long, device=logits.device)
    return logits.index_fill(-1, index, float("-inf"))
