"""Continuous batching for a Hugging Face causal LM: sequences join and leave one running batch between decode steps.

Why: a batch sampler holds every slot until the batch's longest sample ends, so with long-tailed response lengths
the device decodes for ever fewer live sequences, and a batch is only as fresh as its slowest member. Here a
sequence that ends leaves at once (the actor publishes it) and a new prompt takes its slot at the next step.

How: one KV cache for the running batch, padded on the left (per layer, keys and values of shape (B, H, W, D)),
with its attention mask (B, W) and each row's own next position. Newcomers are prefilled together (left-padded
among themselves) and their cache rows are joined to the running cache, both padded on the left to the wider
width; rows that end are cut out, and columns that only padding uses any more are trimmed from the left. Padding
columns are masked, so they carry no attention weight: a row computes what it would compute alone.

Each sequence samples with its own generator, seeded by its request, by inverse-CDF sampling with one uniform draw
per token. What a sequence samples therefore does not depend on which sequences share its steps, so continuous
and batch generation of the same requests give the same tokens (up to the last bits of float arithmetic, which a
different batch width can change).

Weights may change between two steps (the actor applies a broadcast there). Every token records the version the
caller names for the step that sampled it (`token_versions`). Tokens already in the cache keep the keys and values
older weights computed, unless the caller asks for `recompute` (one prefill of every sequence in flight with the
weights now in the model) or `restart` (drop their tokens and start again from the prompt).

Behaviour logprobs follow opd.models.sampler's convention: log-softmax(raw logits / temperature) of the sampled
token over the tokenizer's real ids, before top-p; ids the model never emits are out of the distribution.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from opd.models.sampler import Sample, cache_keyword, top_p_filter
from opd.models.vision import batch_pixels
from opd.models.vocab import never_sampled, real_logits, real_vocab, without_ids


@dataclass
class _Sequence:
    key: str
    prompt: list[int]
    pixel_values: torch.Tensor | None
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)

    def restart(self) -> None:
        self.tokens, self.logprobs, self.versions = [], [], []


def _layers(past) -> list:
    """The cache's per-layer key/value holders; a cache kind whose rows cannot be joined and cut is refused."""
    layers = getattr(past, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        raise NotImplementedError(
            f"streaming generation (actor.generation: stream) needs a dynamic key/value cache; this model's is "
            f"{type(past).__name__}: use actor.generation: batch"
        )
    return layers


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class SlotSampler:
    """Up to any number of sequences in flight; the caller decides how many by when it calls `start`."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eos_ids: Sequence[int],
        pad_id: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ):
        self.model = model
        self.device = next(model.parameters()).device
        self.stop_ids = set(eos_ids)
        self.pad_id, self.max_new_tokens = pad_id, max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.cache_kw = cache_keyword(model)
        self.vocab, self.never = real_vocab(model), never_sampled(model)
        self.queued: deque[_Sequence] = deque()  # started, prefilled at the next step
        self.rows: list[_Sequence] = []  # the running batch, in cache row order
        self.past = None  # the running batch's KV cache (a transformers cache object)
        self.mask: torch.Tensor | None = None  # (B, W): 1 where a row has a real token in the cache

    def start(self, key: str, prompt: list[int], seed: int, pixel_values: torch.Tensor | None = None) -> None:
        """Queue one sequence; it samples with its own generator seeded by `seed`."""
        generator = torch.Generator().manual_seed(seed)  # CPU: one uniform per token, moved to the device
        self.queued.append(_Sequence(key, list(prompt), pixel_values, generator))

    def inflight(self) -> int:
        return len(self.queued) + len(self.rows)

    @torch.no_grad()
    def step(self, version: int) -> list[tuple[str, Sample]]:
        """One token for every sequence in flight (the first for those queued since the last step), sampled by
        weights `version`; returns the sequences that ended with it."""
        if self.rows:
            self._sample(self.rows, self._decode(), version)
        if self.queued:
            newcomers = list(self.queued)
            self.queued.clear()
            past, mask, logits = self._prefill([s.prompt for s in newcomers], newcomers)
            self._sample(newcomers, logits, version)
            self._join(newcomers, past, mask)
        return self._retire()

    @torch.no_grad()
    def recompute(self) -> None:
        """Rebuild the running batch's KV cache with the weights now in the model: each sequence's prompt and
        tokens so far but its last (fed at the next step) are prefilled again."""
        if self.rows:
            self.past, self.mask, _ = self._prefill([s.prompt + s.tokens[:-1] for s in self.rows], self.rows)

    def restart(self) -> int:
        """Drop every running sequence's tokens and queue it again from its prompt (ahead of those queued);
        its generator goes on, so it draws new samples. Returns how many tokens were dropped."""
        dropped = sum(len(s.tokens) for s in self.rows)
        for s in self.rows:
            s.restart()
        self.queued.extendleft(reversed(self.rows))
        self.rows, self.past, self.mask = [], None, None
        return dropped

    def abort(self) -> int:
        """Drop everything in flight; returns how many sequences."""
        n = self.inflight()
        self.queued.clear()
        self.rows, self.past, self.mask = [], None, None
        return n

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, past, pixels):
        images = {} if pixels is None else {"pixel_values": pixels}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kw: past},
            **images,
        )
        new_past = out.cache if self.cache_kw == "cache" else out.past_key_values
        _layers(new_past)
        return out.logits[:, -1, :], new_past

    def _prefill(self, seqs: list[list[int]], owners: list[_Sequence]):
        """Left-padded prefill of `seqs` (each owner's images go with it): their cache, mask and last logits."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        pixels = batch_pixels([o.pixel_values for o in owners])
        logits, past = self._forward(ids, mask, positions, None, pixels)
        return past, mask, logits

    def _decode(self) -> torch.Tensor:
        """Feed each running row its last token; the cache grows by one column."""
        ids = torch.tensor([[s.tokens[-1]] for s in self.rows], dtype=torch.long, device=self.device)
        positions = torch.tensor(
            [[len(s.prompt) + len(s.tokens) - 1] for s in self.rows], dtype=torch.long, device=self.device
        )
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits, self.past = self._forward(ids, mask, positions, self.past, None)
        self.mask = mask
        return logits

    def _sample(self, seqs: list[_Sequence], raw: torch.Tensor, version: int) -> None:
        logits = without_ids(real_logits(raw, self.vocab).float(), self.never)  # (B, V) raw
        if self.temperature == 0:
            token = logits.argmax(-1)
            logp = torch.log_softmax(logits, -1)
        else:
            logp = torch.log_softmax(logits / self.temperature, -1)
            probs = logp.exp()
            if self.top_p < 1.0:
                probs = top_p_filter(probs, self.top_p)
            cdf = probs.double().cumsum(-1)
            u = torch.stack([torch.rand((), generator=s.generator, dtype=torch.float64) for s in seqs])
            token = torch.searchsorted(
                cdf, (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1), right=True
            ).squeeze(-1)
            # a draw that rounds onto the total lands past the end: the last token with mass
            last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
            token = torch.minimum(token, last)
        lp = logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)
        for s, t, v in zip(seqs, token.tolist(), lp.tolist(), strict=True):
            s.tokens.append(t)
            s.logprobs.append(v)
            s.versions.append(version)

    def _join(self, newcomers: list[_Sequence], past, mask: torch.Tensor) -> None:
        """Newcomers' cache rows after the running batch's, both left-padded to the wider width."""
        if not self.rows:
            self.rows, self.past, self.mask = newcomers, past, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(_layers(self.past), _layers(past), strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.rows = self.rows + newcomers

    def _ended(self, s: _Sequence) -> bool:
        return s.tokens[-1] in self.stop_ids or len(s.tokens) >= self.max_new_tokens

    def _retire(self) -> list[tuple[str, Sample]]:
        """Cut out the rows that ended (and the columns only padding uses now); return them as samples."""
        ended = [s for s in self.rows if self._ended(s)]
        if not ended:
            return []
        keep = [i for i, s in enumerate(self.rows) if not self._ended(s)]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.past, self.mask = None, None
        else:
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            mask = self.mask.index_select(0, index)
            start = int(mask.any(0).long().argmax())  # the first column a kept row uses
            self.mask = mask[:, start:]
            for layer in _layers(self.past):
                layer.keys = layer.keys.index_select(0, index)[:, :, start:]
                layer.values = layer.values.index_select(0, index)[:, :, start:]
        return [
            (
                s.key,
                Sample(
                    response_ids=s.tokens,
                    behaviour_logprobs=s.logprobs,
                    finish_reason="stop" if s.tokens[-1] in self.stop_ids else "length",
                    token_versions=s.versions,
                ),
            )
            for s in ended
        ]
