"""The teacher's vocabulary mapped onto the student's, for the top-k losses of a cross-tokenizer teacher.

A teacher id maps to the student id whose token has exactly the same text (`decode([id])`, special tokens kept),
and the special tokens map by role (BOS, EOS, PAD, UNK, and the end-of-turn tokens the scorer names). A token whose
text is not a whole character (a byte piece: it decodes to U+FFFD) or is empty maps to nothing. When several ids
of one side have the same text, the lowest id stands for them. Built once per scorer (a few hundred thousand
decodes for 50k-token vocabularies: under a second) and kept.

What a mapped top-k means (`map_topk`): at a position where both tokenisations start a token at the same text
offset (a chunk's start), the teacher's top-k entries whose token the student also has keep their log-probability
under the student's id; the rest of the teacher's top-k mass joins the tail bucket, whose log-mass the row then
carries, so the row and its tail still sum to the teacher's whole distribution. A mapped probability is the
teacher's probability of that exact token, not of every teacher token that begins with its text ("1" against
"12", "13", ...): with a teacher of longer tokens, much of its mass lands in the tail, and the top-k losses then
pull the student's tail mass toward it rather than toward particular ids. The share of top-k mass that matched is
reported per response (`topk_matched_mass`).
"""

from __future__ import annotations

import numpy as np

from opd.protocol import LOGPROB_FLOOR
from teacher_scorers.alignment import REPLACEMENT, decode

_ROLES = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def _texts(tokenizer, size: int) -> dict[str, int]:
    """Token text -> its lowest id, over ids [0, size) that decode to whole characters."""
    out: dict[str, int] = {}
    special = set(tokenizer.all_special_ids)
    for i in range(size):
        if i in special:
            continue  # mapped by role, never by their text
        text = decode(tokenizer, [i])
        if text and REPLACEMENT not in text:
            out.setdefault(text, i)
    return out


class VocabMap:
    """teacher id -> student id (-1: none), over the teacher's real vocabulary."""

    def __init__(self, student_tok, teacher_tok, student_size: int, teacher_size: int, pairs=()):
        """`pairs`: further (teacher id, student id) by role, such as the two end-of-turn tokens."""
        student = _texts(student_tok, student_size)
        self.to_student = np.full(teacher_size, -1, dtype=np.int64)
        for text, tid in _texts(teacher_tok, teacher_size).items():
            self.to_student[tid] = student.get(text, -1)
        roles = [(getattr(teacher_tok, r), getattr(student_tok, r)) for r in _ROLES]
        for tid, sid in [*roles, *pairs]:
            if tid is not None and sid is not None and 0 <= tid < teacher_size and 0 <= sid < student_size:
                self.to_student[tid] = sid
        self.student_size = student_size

    @property
    def matched(self) -> int:
        return int((self.to_student >= 0).sum())

    def map_topk(
        self, ids: np.ndarray, logprobs: np.ndarray, tail: float | None, width: int
    ) -> tuple[np.ndarray, np.ndarray, float | None, float]:
        """One position's teacher top-k (ids and logprobs) as `width` student ids: the matched entries first in
        the teacher's order (those beyond `width` count as unmatched), then filler ids (the lowest student ids not in the row, at LOGPROB_FLOOR: the row
        keeps its width, and no id repeats, which the learner's student-side tail relies on); the tail's log-mass
        with the unmatched entries added (None stays None: the learner takes 1 - sum of the row, which then holds
        them); and the share of the top-k's mass that matched."""
        ids, lp = np.asarray(ids), np.asarray(logprobs, dtype=np.float64)
        mapped = self.to_student[ids]
        keep = mapped >= 0
        seen: set[int] = set()
        for j in np.flatnonzero(keep):  # two teacher tokens of one text: the first keeps it
            if int(mapped[j]) in seen or len(seen) == width:
                keep[j] = False
            else:
                seen.add(int(mapped[j]))
        out_ids, out_lp = list(mapped[keep]), list(lp[keep])
        k = width
        filler = (i for i in range(self.student_size) if i not in seen)
        while len(out_ids) < k:
            out_ids.append(next(filler))
            out_lp.append(LOGPROB_FLOOR)
        moved = lp[~keep]
        if tail is None or not len(moved):
            new_tail = tail  # None: the learner's 1 - sum(top-k) then counts the moved mass by itself
        else:
            new_tail = float(np.logaddexp.reduce([tail, *moved]))
        total = np.logaddexp.reduce(lp)
        share = float(np.exp(np.logaddexp.reduce(lp[keep]) - total)) if keep.any() else 0.0
        return np.asarray(out_ids, dtype=np.int32), np.asarray(out_lp, dtype=np.float32), new_tail, share
