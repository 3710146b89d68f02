"""Scored trajectories to padded tensors, and token-budget micro-batches packed by length.

Micro-batches are cut to their own longest sequence, so peak memory follows the budget rather than the longest
response that happened to land in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from opd.protocol import Trajectory


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, L)
    positions: torch.Tensor  # (B, T) index of the logit row that predicts each response token
    targets: torch.Tensor  # (B, T) response token ids
    mask: torch.Tensor  # (B, T) 1 on real response tokens
    behaviour: torch.Tensor  # (B, T) b_t
    teacher: torch.Tensor  # (B, T) q_t
    lengths: torch.Tensor  # (B,) prompt + response tokens
    groups: torch.Tensor  # (B,) integer id of the prompt group (GRPO)
    rewards: torch.Tensor | None = None  # (B,) verifier reward
    topk_ids: torch.Tensor | None = None  # (B, T, k)
    topk_logprobs: torch.Tensor | None = None  # (B, T, k)
    # (B, T) log of the teacher's mass outside its top-k, from the scorer's full logits; None when any trajectory
    # lacks it (remote teachers), and the top-k losses then estimate it from the top-k (learner/losses.py).
    teacher_tail: torch.Tensor | None = None
    # A batch holding a joined mixture (learner/join.py) has a teacher axis: topk_ids and topk_logprobs are then
    # (B, T, M, k), teacher_tail (B, T, M), and topk_weights (B, T, M) the route's weights (a single-teacher row
    # is one teacher of weight 1; a row with fewer than M teachers repeats its first one at weight 0, so every
    # slot holds finite values). None: no teacher axis, the single-teacher layout above.
    topk_weights: torch.Tensor | None = None
    # Filled by the learner before the update, over the whole consumed batch (see learner/objective.py):
    advantages: torch.Tensor | None = None  # (B, T) distillation PG advantage
    task_advantages: torch.Tensor | None = None  # (B,) GRPO / REINFORCE++ advantage of the reward
    proximal: torch.Tensor | None = None  # (B, T) logprobs of the parameters at the start of the update
    # A vision-language student's images: every row's pixel_values in row order (images, C, H, W) and each row's
    # count of them (B,). The prompt ids hold the expanded image ids, so lengths (and the token budget of
    # micro-batches and of the ranks' shares) count image tokens with no further work. None: text only.
    pixel_values: torch.Tensor | None = None
    image_counts: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def select(self, rows: list[int]) -> Batch:
        """The given rows, trimmed to their own longest sequence and response."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)
        width = int(self.lengths[idx].max())
        resp = max(1, int(self.mask[idx].sum(-1).max()))
        out = {}
        if self.pixel_values is not None:  # a row's images are its slice of the batch's image rows
            starts = torch.cumsum(self.image_counts, 0) - self.image_counts
            picked = [
                i for r in rows for i in range(int(starts[r]), int(starts[r]) + int(self.image_counts[r]))
            ]
            index = torch.tensor(picked, dtype=torch.long, device=self.pixel_values.device)
            out["pixel_values"] = self.pixel_values.index_select(0, index)
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None or f.name in out:
                out.setdefault(f.name, None)
                continue
            v = v.index_select(0, idx)
            if f.name in ("input_ids", "attention_mask"):
                v = v[:, :width]
            elif v.dim() >= 2:  # (B, T[, k]) response-aligned
                v = v[:, :resp]
            out[f.name] = v
        return replace(self, **out)

    def to(self, device: str | torch.device) -> Batch:
        return replace(self, **{f.name: _to(getattr(self, f.name), device) for f in fields(self)})


def _to(v, device):
    return None if v is None else v.to(device)


def _fill(dst: torch.Tensor, row: int, values, dtype) -> None:
    n = len(values)
    if n:
        dst[row, :n] = torch.as_tensor(values.copy(), dtype=dtype)  # copy: wire arrays are read-only views


def _teacher_slabs(t: Trajectory) -> tuple | None:
    """A trajectory's top-k as (ids (M, T, k), logprobs (M, T, k), tail (M, T) or None, weights [M]); a
    single-teacher one is M = 1 at weight 1, a joined mixture its teachers in sorted(teacher_weights) order."""
    if t.mixture_topk_ids is not None:
        weights = [t.teacher_weights[n] for n in sorted(t.teacher_weights)]
        return t.mixture_topk_ids, t.mixture_topk_logprobs, t.mixture_tail_logprobs, weights
    if t.teacher_topk_ids is None:
        return None
    tail = None if t.teacher_tail_logprobs is None else t.teacher_tail_logprobs[None]
    return t.teacher_topk_ids[None], t.teacher_topk_logprobs[None], tail, [1.0]


def _teacher_axis(slabs: list[tuple], resp: int) -> tuple[torch.Tensor, ...]:
    """(B, T, M, k) ids and logprobs, (B, T, M) tail (or None) and weights, for a batch holding a mixture."""
    B, M, k = len(slabs), max(len(s[3]) for s in slabs), slabs[0][0].shape[2]
    ids = torch.zeros((B, resp, M, k), dtype=torch.long)
    lp = torch.zeros((B, resp, M, k))
    have_tail = all(s[2] is not None for s in slabs)
    tail = torch.zeros((B, resp, M)) if have_tail else None
    weights = torch.zeros((B, resp, M))
    for i, (s_ids, s_lp, s_tail, w) in enumerate(slabs):
        T = s_ids.shape[1]
        for m in range(M):
            j = m if m < len(w) else 0  # a padding slot: the first teacher again, at weight 0
            ids[i, :T, m] = torch.as_tensor(s_ids[j].copy(), dtype=torch.long)
            lp[i, :T, m] = torch.as_tensor(s_lp[j].copy(), dtype=torch.float32)
            if have_tail:
                tail[i, :T, m] = torch.as_tensor(s_tail[j].copy(), dtype=torch.float32)
            weights[i, :T, m] = w[m] if m < len(w) else 0.0
    return ids, lp, tail, weights


def collate(
    trajs: list[Trajectory],
    pad_id: int,
    device: str = "cpu",
    pixels: Callable[[Trajectory], torch.Tensor | None] | None = None,
) -> Batch:
    """Right-padded tensors of the trajectories; optional fields (rewards, top-k, teacher tail) only when every
    trajectory has them, so one batch never mixes two kinds of input to the loss. A batch holding a joined
    mixture gets the teacher axis (Batch.topk_weights). `pixels`: a vision-language student's pixel_values of a
    trajectory's images (opd.models.vision.pixel_reader), raising on a bad image, which the intake then
    dead-letters as the culprit of a failed collate."""
    B = len(trajs)
    width = max(len(t.prompt_token_ids) + len(t.response_token_ids) for t in trajs)
    resp = max(1, max(len(t.response_token_ids) for t in trajs))
    slabs = [_teacher_slabs(t) for t in trajs]
    mixed = any(t.mixture_topk_ids is not None for t in trajs) and all(s is not None for s in slabs)
    topk = trajs[0].teacher_topk_ids.shape[1] if trajs[0].teacher_topk_ids is not None else 0
    have_topk = not mixed and topk > 0 and all(t.teacher_topk_ids is not None for t in trajs)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    pos, tgt = torch.zeros((B, resp), dtype=torch.long), torch.zeros((B, resp), dtype=torch.long)
    mask, b, q = (torch.zeros((B, resp)) for _ in range(3))
    tk_ids = torch.zeros((B, resp, topk), dtype=torch.long) if have_topk else None
    tk_lp = torch.zeros((B, resp, topk)) if have_topk else None
    have_tail = have_topk and all(t.teacher_tail_logprobs is not None for t in trajs)
    tail = torch.zeros((B, resp)) if have_tail else None
    group_index: dict[str, int] = {}
    groups = torch.tensor([group_index.setdefault(t.group_id, len(group_index)) for t in trajs])
    for i, t in enumerate(trajs):
        P, T = len(t.prompt_token_ids), len(t.response_token_ids)
        _fill(ids, i, t.prompt_token_ids, torch.long)
        ids[i, P : P + T] = torch.as_tensor(t.response_token_ids.copy(), dtype=torch.long)
        attn[i, : P + T] = 1
        pos[i, :T] = torch.arange(P - 1, P - 1 + T)
        tgt[i, :T] = ids[i, P : P + T]
        mask[i, :T] = 1
        _fill(b, i, t.behaviour_logprobs, torch.float32)
        _fill(q, i, t.teacher_logprobs, torch.float32)
        if have_topk:
            _fill(tk_ids, i, t.teacher_topk_ids, torch.long)
            _fill(tk_lp, i, t.teacher_topk_logprobs, torch.float32)
        if have_tail:
            _fill(tail, i, t.teacher_tail_logprobs, torch.float32)
    weights = None
    if mixed:
        tk_ids, tk_lp, tail, weights = _teacher_axis(slabs, resp)
    lengths = attn.sum(-1)
    rewards = (
        torch.tensor([float(t.reward) for t in trajs]) if all(t.reward is not None for t in trajs) else None
    )
    batch = Batch(ids, attn, pos, tgt, mask, b, q, lengths, groups, rewards, tk_ids, tk_lp, tail, weights)
    if pixels is not None:
        rows = [pixels(t) for t in trajs]
        if any(r is not None for r in rows):
            batch.pixel_values = torch.cat([r for r in rows if r is not None])
            batch.image_counts = torch.tensor(
                [0 if r is None else r.shape[0] for r in rows], dtype=torch.long
            )
    return batch.to(device)


def pack_by_length(lengths: list[int], max_rows: int = 0, max_tokens: int = 0) -> list[list[int]]:
    """Row indices per micro-batch: sorted by length, greedily filled while rows x longest <= max_tokens and
    rows <= max_rows (0 = no limit). A single sequence longer than the budget gets a micro-batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out:
            cur = out[-1]
            rows, longest = len(cur) + 1, max(lengths[i], lengths[cur[-1]])
            if (not max_rows or rows <= max_rows) and (not max_tokens or rows * longest <= max_tokens):
                cur.append(i)
                continue
        out.append([i])
    return out


def split_minibatches(size: int, count: int) -> list[list[int]]:
    """`count` contiguous, nearly equal row ranges: one optimiser step each."""
    edges = [round(j * size / count) for j in range(count + 1)]
    return [list(range(edges[j], edges[j + 1])) for j in range(count) if edges[j + 1] > edges[j]]
