"""Batched sampling from a Hugging Face causal LM with the behaviour logprobs the learner needs.

The behaviour logprob of a token is log-softmax(raw logits / temperature) at that token: the distribution the
learner recomputes from the same weights. Logprobs taken after logits processors (top-p truncation, EOS masking)
would describe a different distribution, and the importance ratio exp(s - b) would then be biased. For the same
reason the distribution is over the tokenizer's real ids only (opd.models.vocab), as the learner's is: logit
columns of padded embedding rows are cut before the softmax, so they are never sampled and carry no mass.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from opd.models.vocab import never_sampled, real_logits, real_vocab, without_ids


@dataclass
class Sample:
    response_ids: list[int]
    behaviour_logprobs: list[float]
    finish_reason: str  # "stop" (EOS emitted) or "length"
    # the weight version that sampled each token: set by streaming generation (opd.models.slots), where weights
    # may change between two tokens of one sequence; None when one version sampled them all
    token_versions: list[int] | None = None


def _left_pad(prompts: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the smallest set whose mass reaches top_p (renormalised by multinomial)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def cache_keyword(model: torch.nn.Module) -> str:
    """The name this model's forward takes its KV cache by: transformers 5.x renames `past_key_values` to `cache`
    model by model, and the old name raises a FutureWarning, which in a crashed actor's log was the whole tail the
    launcher showed instead of the error. Models not yet renamed (or wrapped behind `**kwargs`) keep the old name."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    eos_id: int | Sequence[int],
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    pixel_values: torch.Tensor | None = None,
) -> list[Sample]:
    """Sample one continuation per prompt; temperature 0 means greedy. Returns behaviour logprobs per token.

    Ids the model never emits (`opd.models.vocab.never_sampled`: a vision-language model's image placeholder)
    are out of the distribution: sampled from and recorded over the rest, as the learner recomputes it.

    `eos_id` is the token a response ends with, or several (a chat model's end of turn and its EOS): the response
    stops at, and keeps, the first of them it samples. `pixel_values`: a vision-language model's images, in prompt
    order (opd.models.vlm.pixel_values), for prompts whose ids hold the expanded image ids; given to the prefill
    only (decode steps read the image through the KV cache)."""
    device = next(model.parameters()).device
    stop = torch.tensor(
        [eos_id] if isinstance(eos_id, int) else list(eos_id), dtype=torch.long, device=device
    )
    ids, mask = _left_pad(prompts, pad_id, str(device))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = len(prompts)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out_ids = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    past, step_ids, step_pos = None, ids, positions
    cache_kw = cache_keyword(model)
    vocab = real_vocab(model)
    never = never_sampled(model)
    for t in range(max_new_tokens):
        images = {"pixel_values": pixel_values} if t == 0 and pixel_values is not None else {}
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_pos,
            use_cache=True,
            **{cache_kw: past},
            **images,
        )
        past = out.cache if cache_kw == "cache" else out.past_key_values
        logits = without_ids(real_logits(out.logits[:, -1, :], vocab).float(), never)  # (B, V) raw
        if temperature == 0:
            token = logits.argmax(-1)
            logp = torch.log_softmax(logits, -1)
        else:
            logp = torch.log_softmax(logits / temperature, -1)
            probs = logp.exp()
            if top_p < 1.0:
                probs = top_p_filter(probs, top_p)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out_ids[:, t] = token
        out_lp[:, t] = logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)
        lengths += (~done).long()
        done |= torch.isin(token, stop)
        if bool(done.all()):  # a CPU-GPU sync point on CUDA, once per token
            break
        step_ids = token.unsqueeze(-1)
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
    results = []
    ids_cpu, lp_cpu, len_cpu, done_cpu = out_ids.cpu(), out_lp.cpu(), lengths.cpu(), done.cpu()
    for i in range(batch):
        n = int(len_cpu[i])
        results.append(
            Sample(
                response_ids=ids_cpu[i, :n].tolist(),
                behaviour_logprobs=lp_cpu[i, :n].tolist(),
                finish_reason="stop" if bool(done_cpu[i]) else "length",
            )
        )
    return results


@torch.no_grad()
def response_logprobs(
    model: torch.nn.Module,
    sequences: list[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    temperature: float = 1.0,
    topk: int = 0,
    pixel_values: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """Log-probs of each response token given its prompt, from one right-padded forward.

    Used by scorers (teacher) and tests; the learner has its own differentiable version. Returns per sequence the
    sampled-token logprobs (T,) and, when topk > 0, top-k ids (T, k) and logprobs (T, k).
    """
    device = next(model.parameters()).device
    full = [p + r for p, r in sequences]
    width = max(len(s) for s in full)
    ids = torch.full((len(full), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(full):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    images = {} if pixel_values is None else {"pixel_values": pixel_values}
    logits = real_logits(
        model(input_ids=ids, attention_mask=mask, **images).logits, real_vocab(model)
    )  # (B, L, V): the model's own distribution (a teacher's reference), never_sampled ids included
    sampled, tk_ids, tk_lp = [], [], []
    for i, (p, r) in enumerate(sequences):
        # Position j predicts token j+1. Only response rows are normalised: prompt rows would cost B*P*V for nothing.
        rows = torch.log_softmax(logits[i, len(p) - 1 : len(p) - 1 + len(r)].float() / temperature, -1)
        target = torch.tensor(r, dtype=torch.long, device=device)
        sampled.append(rows.gather(-1, target.unsqueeze(-1)).squeeze(-1).cpu())
        if topk > 0:
            vals, idx = rows.topk(min(topk, rows.shape[-1]), dim=-1)
            tk_ids.append(idx.cpu())
            tk_lp.append(vals.cpu())
    return sampled, (tk_ids if topk > 0 else None), (tk_lp if topk > 0 else None)
