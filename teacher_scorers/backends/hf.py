"""The Hugging Face teacher (`scorer.engine: hf`): the teacher model in this process, one right-padded forward per
length bucket. It sees the full distribution, so with a top-k it also supplies the exact tail mass."""

from __future__ import annotations

import numpy as np
import torch

from opd.config import Config
from opd.models.builds import Assets, load_asset
from opd.protocol import Trajectory
from teacher_scorers.backends.common import attach, check_teacher_tokenizer, length_buckets


@torch.no_grad()
def teacher_rows(
    model: torch.nn.Module,
    sequences: list[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    temperature: float,
    topk: int,
) -> list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]]:
    """Per sequence: the response tokens' logprobs (T,) and, when topk > 0, top-k ids and logprobs (T, k) and the
    log of the mass outside the top-k (T,), all from log-softmax(logits / temperature) of one padded forward.

    The tail is logsumexp of the non-top-k scaled logits minus logsumexp of all of them: exact to float32's
    relative precision however small the tail is, where 1 - sum(exp(top-k)) cancels to 0 below ~1e-7."""
    device = next(model.parameters()).device
    full = [p + r for p, r in sequences]
    ids = torch.full((len(full), max(len(s) for s in full)), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(full):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, L, V)
    out = []
    for i, (p, r) in enumerate(sequences):
        # Position j predicts token j+1; only response rows are normalised (prompt rows would cost B*P*V).
        rows = torch.log_softmax(logits[i, len(p) - 1 : len(p) - 1 + len(r)].float() / temperature, -1)
        target = torch.tensor(r, dtype=torch.long, device=device).unsqueeze(-1)
        lp = rows.gather(-1, target).squeeze(-1).cpu().numpy()
        if topk == 0:
            out.append((lp, None, None, None))
            continue
        top_lp, top_ids = rows.topk(min(topk, rows.shape[-1]), dim=-1)
        # rows are z - logsumexp(z), so this is logsumexp(non-top-k z) - logsumexp(z); -inf when k covers V
        tail = torch.logsumexp(rows.scatter(-1, top_ids, float("-inf")), -1)
        out.append((lp, top_ids.cpu().numpy(), top_lp.cpu().numpy(), tail.cpu().numpy()))
    return out


class HFTeacher:
    """The teacher as a Hugging Face model in this process."""

    def __init__(self, cfg: Config, assets: Assets):
        self.cfg = cfg
        self.model, self.tokenizer = load_asset(assets.teacher, cfg.scorer.device)
        self.model.eval()
        check_teacher_tokenizer(assets, self.tokenizer)
        self.vocab_size = self.model.get_input_embeddings().weight.shape[0]
        self.teacher_id = assets.teacher.path

    def score(self, trajs: list[Trajectory]) -> None:
        sc = self.cfg.scorer
        for bucket in length_buckets(trajs, sc.max_tokens_per_batch):
            seqs = [(t.prompt_token_ids.tolist(), t.response_token_ids.tolist()) for t in bucket]
            rows = teacher_rows(
                self.model, seqs, pad_id=self.tokenizer.pad_token_id, temperature=sc.temperature, topk=sc.topk
            )
            for t, (lp, tk_ids, tk_lp, tail) in zip(bucket, rows, strict=True):
                attach(t, lp, tk_ids, tk_lp, self.teacher_id, sc.temperature, tail)
