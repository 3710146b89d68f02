"""The Hugging Face teacher (`scorer.engine: hf`): the teacher model in this process, one right-padded forward per
length bucket. It sees the full distribution, so with a top-k it also supplies the exact tail mass.

Every distribution is over the tokenizer's real ids only (opd.models.vocab): logit columns beyond them (the
embedding's padding rows) are cut before the log-softmax, so logprobs, top-k and tail are renormalised over the
real vocabulary and a top-k id is never a padding row.

The teacher's input is its prompt (the student's, or with `scorer.context` in place of the student's system turn:
opd.models.prompts.TeacherPrompts) followed by the student's response ids. Every teacher input starts with the
same ids (the context, or the chat template's system turn), so with `scorer.prefix_cache` their KV cache is
computed once, when the teacher starts (its weights never change), and each forward runs only the rest.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from opd.config import Config
from opd.models.builds import Assets, load_asset
from opd.models.sampler import cache_keyword
from opd.models.vision import batch_pixels, check_same_vision, load_vision
from opd.models.vocab import real_logits, real_vocab
from opd.protocol import Trajectory
from teacher_scorers.backends.base import PartlyScored
from teacher_scorers.backends.common import (
    attach,
    check_teacher_tokenizer,
    length_buckets,
    teacher_inputs,
    teacher_prompts,
)

Rows = tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]
KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values (1, heads, P, head_dim)


def _response_rows(
    logits: torch.Tensor, start: int, response: list[int], temperature: float, topk: int
) -> Rows:
    """From one sequence's logits (L, V) whose row `start` predicts the first response token: the response
    tokens' logprobs (T,) and, when topk > 0, top-k ids and logprobs (T, k) and the log of the mass outside the
    top-k (T,), all from log-softmax(logits / temperature).

    The tail is logsumexp of the non-top-k scaled logits minus logsumexp of all of them: exact to float32's
    relative precision however small the tail is, where 1 - sum(exp(top-k)) cancels to 0 below ~1e-7."""
    # only response rows are normalised (prompt rows would cost B*P*V)
    rows = torch.log_softmax(logits[start : start + len(response)].float() / temperature, -1)
    target = torch.tensor(response, dtype=torch.long, device=logits.device).unsqueeze(-1)
    lp = rows.gather(-1, target).squeeze(-1).cpu().numpy()
    if topk == 0:
        return lp, None, None, None
    top_lp, top_ids = rows.topk(min(topk, rows.shape[-1]), dim=-1)
    # rows are z - logsumexp(z), so this is logsumexp(non-top-k z) - logsumexp(z); -inf when k covers V
    tail = torch.logsumexp(rows.scatter(-1, top_ids, float("-inf")), -1)
    return lp, top_ids.cpu().numpy(), top_lp.cpu().numpy(), tail.cpu().numpy()


def _right_padded(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


@torch.no_grad()
def teacher_rows(
    model: torch.nn.Module,
    sequences: list[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    temperature: float,
    topk: int,
    pixel_values: torch.Tensor | None = None,
) -> list[Rows]:
    """Per (prompt, response) sequence, `_response_rows` of one right-padded forward of prompt + response, over
    the model's real vocabulary; a vision-language teacher's images as `pixel_values`, in sequence order."""
    device = next(model.parameters()).device
    ids, mask = _right_padded([p + r for p, r in sequences], pad_id, device)
    images = {} if pixel_values is None else {"pixel_values": pixel_values.to(device)}
    logits = real_logits(model(input_ids=ids, attention_mask=mask, **images).logits, real_vocab(model))
    # position j predicts token j+1
    return [_response_rows(logits[i], len(p) - 1, r, temperature, topk) for i, (p, r) in enumerate(sequences)]


@torch.no_grad()
def prefix_kv(model: torch.nn.Module, prefix: list[int]) -> KV | None:
    """Keys and values of one forward of `prefix`, per layer; None when the model's cache is not a plain one
    (sliding-window or other layers that could not simply be repeated for a batch)."""
    device = next(model.parameters()).device
    kw = cache_keyword(model)
    out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True, **{kw: DynamicCache()})
    cache = out.cache if kw == "cache" else out.past_key_values
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


@torch.no_grad()
def teacher_rows_after_prefix(
    model: torch.nn.Module,
    kv: KV,
    sequences: list[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    temperature: float,
    topk: int,
    pixel_values: torch.Tensor | None = None,
) -> list[Rows]:
    """`teacher_rows` of sequences whose first P ids (P = the cached prefix's length) are the prefix `kv` was
    computed from: one right-padded forward of the rest, attending to the cached keys and values. Each prompt
    must be longer than P, so that the row predicting its first response token is in the forward."""
    device = next(model.parameters()).device
    P = kv[0][0].shape[-2]
    rest = [(p + r)[P:] for p, r in sequences]
    ids, mask = _right_padded(rest, pad_id, device)
    B, L = ids.shape
    mask = torch.cat([torch.ones((B, P), dtype=mask.dtype, device=device), mask], dim=1)  # (B, P + L)
    positions = torch.arange(P, P + L, device=device).expand(B, L)  # right padding: real tokens start at P
    # expand() is a view: the cache concatenates new keys onto a copy, so the stored prefix is never written
    cache = DynamicCache([(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in kv])
    kw = cache_keyword(model)
    images = (
        {} if pixel_values is None else {"pixel_values": pixel_values.to(device)}
    )  # image ids follow the prefix
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{kw: cache}, **images
    )
    logits = real_logits(out.logits, real_vocab(model))
    return [
        _response_rows(logits[i], len(p) - 1 - P, r, temperature, topk) for i, (p, r) in enumerate(sequences)
    ]


class HFTeacher:
    """The teacher as a Hugging Face model in this process."""

    def __init__(self, cfg: Config, assets: Assets):
        self.cfg = cfg
        self.model, self.tokenizer = load_asset(assets.teacher, cfg.scorer.device)
        self.model.eval()
        check_teacher_tokenizer(cfg, assets, self.tokenizer)
        # a vision-language teacher reads the prompts' images with its own processor: it must read them as the
        # student does (same placeholder, same image ids per image, same pixels)
        self.vision = load_vision(assets.teacher.path)
        student = load_vision(assets.student.path)
        check_same_vision(student, self.vision)
        # the pixels are then the student's: the scorer's receipt check made them already (one decode per prompt)
        self.pixels = student or self.vision
        # the tokenizer's ids, not the embedding's rows: the scorer refuses a padding id on decode
        self.vocab_size = real_vocab(self.model)
        self.teacher_id = assets.teacher.path
        self.max_pixels = cfg.images.max_pixels
        self.prompts = teacher_prompts(cfg, self.tokenizer)
        # The shared head minus its last id: a prompt is at least the head, so the row predicting the first
        # response token (the prompt's last position) is always in the forward of the rest.
        self.prefix = list(self.prompts.teacher_head[:-1])
        self.kv = (
            prefix_kv(self.model, self.prefix) if cfg.scorer.prefix_cache and len(self.prefix) > 1 else None
        )

    def _cached(self, prompt: list[int]) -> bool:
        return (
            self.kv is not None
            and len(prompt) > len(self.prefix)
            and prompt[: len(self.prefix)] == self.prefix
        )

    def score(self, trajs: list[Trajectory]) -> None:
        sc = self.cfg.scorer
        seqs, failures = teacher_inputs(self.prompts, trajs)
        todo = [i for i in range(len(trajs)) if i not in failures]
        # cached and plain sequences go in separate forwards, each bucketed by the tokens it actually runs
        for cached in (True, False):
            group = [i for i in todo if self._cached(seqs[i][0]) == cached]
            skip = len(self.prefix) if cached else 0
            forward_len = lambda i: len(seqs[i][0]) + len(seqs[i][1]) - skip  # noqa: E731, B023
            for bucket in length_buckets(group, sc.max_tokens_per_batch, forward_len):
                batch = [seqs[i] for i in bucket]
                kw = {"pad_id": self.tokenizer.pad_token_id, "temperature": sc.temperature, "topk": sc.topk}
                if self.vision is not None:  # images checked on receipt; their pixels cached there
                    kw["pixel_values"] = batch_pixels(
                        [
                            self.pixels.prompt_pixels(seqs[i][0], trajs[i].images, self.max_pixels)
                            for i in bucket
                        ]
                    )
                if cached:
                    rows = teacher_rows_after_prefix(self.model, self.kv, batch, **kw)
                else:
                    rows = teacher_rows(self.model, batch, **kw)
                for i, (lp, tk_ids, tk_lp, tail) in zip(bucket, rows, strict=True):
                    attach(trajs[i], lp, tk_ids, tk_lp, self.teacher_id, sc.temperature, tail)
        if failures:
            raise PartlyScored(failures, len(trajs))
