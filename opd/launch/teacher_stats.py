"""Per-teacher figures of a run of several teachers, from the components' metrics records (issue 18).

One function shared by the three readers, so `opd top`, summary.json and the report page cannot disagree: each
teacher's pool is its scorers (`scorer-<teacher>-<i>`, `scorer-<i>` for the default teacher: `teacher_of`),
whose counters give what it scored, how long its batches took and what failed; the learner's
`trajectories_trained:<teacher>` counters (learner/learner.py teacher_shares: a mixture counted by its route's
weights) give each teacher's share of what was trained. Pure: records in, numbers out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from opd.launch.supervisor import teacher_of

TRAINED = "trajectories_trained:"  # the learner's per-teacher counter prefixes
JOIN_TIMEOUTS = "join_timeouts:"  # mixtures whose join timed out without this teacher's copy
SUMMED = (
    "trajectories_scored",
    "tokens_scored",
    "score_seconds",
    "score_batches",
    "score_failures",
    "dead_lettered",
    # a teacher of another tokenizer (teacher_scorers/backends/cross_tokenizer.py)
    "alignment_responses",
    "alignment_chunks",
    "alignment_student_tokens",
    "alignment_topk_positions",
    "alignment_topk_matched_mass",
    "alignment_failures",
)


def _num(rec: dict[str, Any], key: str) -> float:
    value = rec.get(key)
    return float(value) if isinstance(value, int | float) else 0.0


def pool_members(teacher: str, names: Iterable[str]) -> list[str]:
    """The components of `names` that are scorers of `teacher`'s pool."""
    return sorted(n for n in names if teacher_of(n) == teacher)


def trained_shares(teachers: Iterable[str], learner: dict[str, Any] | None) -> dict[str, float | None]:
    """teacher -> its share of the trajectories trained (None before the learner has trained any)."""
    counts = {t: _num(learner or {}, TRAINED + t) for t in teachers}
    total = sum(counts.values())
    return {t: (c / total if total > 0 else None) for t, c in counts.items()}


def per_teacher(
    teachers: Iterable[str], components: dict[str, dict[str, Any]], learner: dict[str, Any] | None
) -> dict[str, dict[str, Any]]:
    """teacher -> totals of its pool (`components`: name -> record with counters summed over incarnations, as the
    launcher's RunState.latest and summary.json's `components` hold them), in the order of `teachers`:
    scorers, the SUMMED counters, the learner's join timeouts missing its copy, failures (teacher failures +
    dead letters + join timeouts), mean batch seconds
    (score_seconds / score_batches), the learner's trajectories trained for it and their share; for a teacher of
    another tokenizer, chunks per response and the share of its top-k mass matched to student ids."""
    teachers = list(teachers)
    shares = trained_shares(teachers, learner)
    out: dict[str, dict[str, Any]] = {}
    for t in teachers:
        members = pool_members(t, components)
        row: dict[str, Any] = {"scorers": len(members)}
        for key in SUMMED:
            row[key] = sum(_num(components[n], key) for n in members)
        row["join_timeouts"] = _num(learner or {}, JOIN_TIMEOUTS + t)
        row["failures"] = row["score_failures"] + row["dead_lettered"] + row["join_timeouts"]
        row["batch_seconds"] = row["score_seconds"] / row["score_batches"] if row["score_batches"] else None
        aligned, positions = row["alignment_responses"], row["alignment_topk_positions"]
        row["chunks_per_response"] = row["alignment_chunks"] / aligned if aligned else None
        row["topk_matched_share"] = row["alignment_topk_matched_mass"] / positions if positions else None
        row["trajectories_trained"] = _num(learner or {}, TRAINED + t)
        row["share"] = shares[t]
        out[t] = row
    return out
