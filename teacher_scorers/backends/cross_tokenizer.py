"""A teacher of another tokenizer (`tokenizer: different`): the backend the config names, scoring the teacher's own
tokens of the student's text, with the result mapped back onto the student's tokens.

Per trajectory (`TeacherView`):
1. The teacher's prompt: the conversation the actor stamped (`CONVERSATION_KEY`), rendered as the teacher renders
   prompts (its chat template when the task uses templates and it has one, BOS + text otherwise); without a
   stamp (a student with no chat template), the student's prompt text, decoded, as a plain prompt.
2. The teacher's response: the student's response decoded to text and tokenised by the teacher, less the
   student's final stop token (EOS or end-of-turn), which maps to the teacher's own stop token as a chunk of its
   own. A text the teacher's tokenizer does not give back exactly (normalisation, unknown characters) cannot be
   aligned: the trajectory is dead-lettered with the first differing character, never trained on.
3. The backend scores (prompt, response) in the teacher's vocabulary (any backend: in-process, vLLM, a server).
4. Back onto the student (teacher_scorers/alignment.py): per aligned chunk, the teacher's logprob sum is spread
   over the chunk's student tokens in proportion to their behaviour surprisal; a chunk's first student token
   gets the teacher's top-k at the chunk's start in student ids (teacher_scorers/vocab_map.py); a token inside
   a chunk, where no teacher distribution lines up with it, gets its own sampled id at its share q_t, with the
   rest of the mass as the tail. With identical tokenizers every chunk is one token and the result is exactly
   the plain backend's.

Counters (`take_counters`, added to the scorer's reporter): responses aligned, their chunks and student tokens,
top-k positions and their matched mass, and alignment failures.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import numpy as np

from opd.config import Config
from opd.models.builds import Assets
from opd.models.loading import load_tokenizer
from opd.models.prompts import prompt_ids, stop_token_id, stop_token_ids
from opd.models.vocab import tokenizer_vocab
from opd.protocol import CONVERSATION_KEY, LOGPROB_FLOOR, Trajectory
from opd.tasks import Problem
from teacher_scorers.alignment import (
    AlignmentError,
    Chunk,
    align,
    chunk_sums,
    spread,
    token_ends,
)
from teacher_scorers.backends.base import PartlyScored, TeacherBackend, TeacherError
from teacher_scorers.backends.common import attach
from teacher_scorers.vocab_map import VocabMap


@dataclass
class TeacherView:
    """One trajectory as the teacher sees it, and how its tokens line up with the student's."""

    surrogate: Trajectory  # the teacher's prompt and response ids, for the backend to score
    chunks: list[Chunk]


@dataclass
class Counters:
    """What the alignment did since the scorer last took the counts (Reporter counter names: `alignment_<field>`)."""

    responses: int = 0
    chunks: int = 0
    student_tokens: int = 0
    topk_positions: int = 0
    topk_matched_mass: float = 0.0
    failures: int = 0

    def take(self) -> dict[str, float]:
        """The non-zero counts as Reporter increments, and back to zero."""
        out = {f"alignment_{k}": v for k, v in asdict(self).items() if v}
        for f in fields(self):
            setattr(self, f.name, f.default)
        return out


def _first_difference(a: str, b: str) -> str:
    i = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"character {i}: student text {a[i : i + 12]!r}, teacher's re-tokenised text {b[i : i + 12]!r}"


def _log1mexp(q: float) -> float:
    return float(np.log(-np.expm1(q))) if q < 0 else -np.inf


class CrossTokenizerTeacher:
    """`inner` (the configured backend, built for the teacher's tokenizer) behind the student's vocabulary."""

    def __init__(self, cfg: Config, assets: Assets, inner: TeacherBackend):
        self.inner, self.cfg = inner, cfg
        self.student_tok = load_tokenizer(assets.student.tokenizer)
        self.teacher_tok = load_tokenizer(assets.teacher.tokenizer)
        self.vocab_size = tokenizer_vocab(self.student_tok)
        self.teacher_id = inner.teacher_id
        self.chat = cfg.task.chat_template == "auto"
        self.student_stops = set(stop_token_ids(self.student_tok, self.chat))
        self.teacher_stop = stop_token_id(self.teacher_tok, self.chat)
        pairs = [(self.teacher_stop, stop_token_id(self.student_tok, self.chat))]
        self.vocab = VocabMap(self.student_tok, self.teacher_tok, self.vocab_size, inner.vocab_size, pairs)
        self.width = min(cfg.scorer.topk, self.vocab_size)
        self.counters = Counters()

    def take_counters(self) -> dict[str, float]:
        return self.counters.take()

    # ---------------------------------------------------------------------------------------- the teacher's view
    def _teacher_prompt(self, t: Trajectory) -> list[int]:
        stamped = t.task.get(CONVERSATION_KEY)
        if stamped is not None:
            messages = [(m["role"], m["content"]) for m in json.loads(stamped)]
            last = messages[-1][1] if messages else ""
            problem = Problem(t.prompt_id, last, messages=tuple(messages), chat_template=self.chat)
            return prompt_ids(self.teacher_tok, problem)
        if getattr(self.student_tok, "chat_template", None) and self.chat:
            raise AlignmentError(
                "no conversation stamped on the trajectory (an actor of another version?): a student's chat "
                "prompt cannot be re-rendered for the teacher from its ids"
            )
        text = self.student_tok.decode(t.prompt_token_ids.tolist(), skip_special_tokens=True)
        return prompt_ids(self.teacher_tok, Problem(t.prompt_id, text, chat_template=self.chat))

    def view(self, t: Trajectory) -> TeacherView:
        """The teacher's prompt and response for `t`, with the chunks (AlignmentError when there are none)."""
        response = t.response_token_ids.tolist()
        stop = response[-1] if response and response[-1] in self.student_stops else None
        body = response[:-1] if stop is not None else response
        chunks: list[Chunk] = []
        teacher_body: list[int] = []
        if body:
            text, student_ends = token_ends(self.student_tok, body)
            teacher_body = self.teacher_tok(text, add_special_tokens=False)["input_ids"]
            teacher_text, teacher_ends = token_ends(self.teacher_tok, teacher_body)
            if teacher_text != text:
                raise AlignmentError(
                    "the teacher's tokenizer does not reproduce the response's text: "
                    + _first_difference(text, teacher_text)
                )
            chunks = align(student_ends, teacher_ends, len(text))
        elif stop is None:
            raise AlignmentError("empty response")
        if stop is not None:  # the stop token: a chunk of its own, the student's against the teacher's
            n, m = len(body), len(teacher_body)
            end = chunks[-1].c1 if chunks else 0
            chunks.append(Chunk(n, n + 1, m, m + 1, end, end))
            teacher_body = [*teacher_body, self.teacher_stop]
        surrogate = Trajectory(
            run_id=t.run_id,
            prompt_id=t.prompt_id,
            group_id=t.group_id,
            sample_index=t.sample_index,
            prompt_token_ids=np.asarray(self._teacher_prompt(t), dtype=np.int32),
            response_token_ids=np.asarray(teacher_body, dtype=np.int32),
            behaviour_logprobs=np.zeros(len(teacher_body), dtype=np.float32),
            policy_version=t.policy_version,
            task=t.task,
            id=t.id,
        )
        return TeacherView(surrogate, chunks)

    # ----------------------------------------------------------------------------------------- back to the student
    def _topk(self, t: Trajectory, v: TeacherView, q: np.ndarray):
        """The student's top-k rows (ids, logprobs, tail or None) from the teacher's, chunk by chunk; stamps the
        mean matched share on `t`."""
        s = v.surrogate
        T, k = len(t.response_token_ids), self.width
        ids = np.zeros((T, k), dtype=np.int32)
        lps = np.full((T, k), LOGPROB_FLOOR, dtype=np.float32)
        has_tail = s.teacher_tail_logprobs is not None
        tails = np.full(T, -np.inf, dtype=np.float64)
        shares = []
        for c in v.chunks:
            tail = float(s.teacher_tail_logprobs[c.t0]) if has_tail else None
            row_ids, row_lp, row_tail, share = self.vocab.map_topk(
                s.teacher_topk_ids[c.t0], s.teacher_topk_logprobs[c.t0], tail, k
            )
            ids[c.s0], lps[c.s0] = row_ids, row_lp
            tails[c.s0] = -np.inf if row_tail is None else row_tail
            shares.append(share)
            for j in range(c.s0 + 1, c.s1):  # inside the chunk: the sampled token at its share
                sampled = int(t.response_token_ids[j])
                ids[j] = [sampled, *(i for i in range(k) if i != sampled)][:k]
                lps[j, 0] = q[j]
                tails[j] = _log1mexp(float(q[j]))
        self.counters.topk_positions += len(shares)
        self.counters.topk_matched_mass += float(np.sum(shares))
        t.teacher_topk_matched = min(float(np.mean(shares)), 1.0)
        return ids, lps, (tails if has_tail else None)

    def _attach(self, t: Trajectory, v: TeacherView) -> None:
        s = v.surrogate
        q = spread(t.behaviour_logprobs, chunk_sums(s.teacher_logprobs, v.chunks, "t"), v.chunks)
        topk = self._topk(t, v, q) if s.teacher_topk_ids is not None and self.width else (None, None, None)
        attach(t, q, *topk[:2], self.teacher_id, s.teacher_temperature, topk[2])
        t.teacher_chunks = len(v.chunks)
        self.counters.responses += 1
        self.counters.chunks += len(v.chunks)
        self.counters.student_tokens += len(t.response_token_ids)

    def score(self, trajs: list[Trajectory]) -> None:
        failures: dict[int, Exception] = {}
        views: dict[int, TeacherView] = {}
        for i, t in enumerate(trajs):
            try:
                views[i] = self.view(t)
            except (AlignmentError, ValueError) as exc:
                self.counters.failures += 1
                failures[i] = TeacherError(
                    f"cross-tokenizer alignment of trajectory {t.id}", str(exc), retryable=False
                )
        order = list(views)
        try:
            self.inner.score([views[i].surrogate for i in order])
        except PartlyScored as exc:
            failures.update({order[j]: e for j, e in exc.failures.items()})
        for i in order:
            if i not in failures:
                self._attach(trajs[i], views[i])
        if failures:
            raise PartlyScored(failures, len(trajs))
