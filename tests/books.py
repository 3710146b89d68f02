"""The books of a run, by trajectory id: what was generated (actor ledgers), trained (trained_ids.txt),
dead-lettered, dropped as too stale, and what is still queued in Redis. Shared by every fault test (chaos,
network namespaces) so they all balance the same books; `violations` states the invariants they all assert."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Collection
from pathlib import Path

import redis
import yaml

from broker.base import is_work_stream
from opd.protocol import decode
from tests.conftest import CHAOS_BOOKS, children_of


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _queued(client: redis.Redis, run_id: str) -> tuple[set[str], int]:
    """Ids of the trajectories still in the work streams, and how many entries there could not be decoded (a
    malformed message a test injected and nobody consumed yet: still queued, but it has no id to book)."""
    queued, undecodable = set(), 0
    # rollouts and scored, and with several teachers each teacher's pair (rollouts:<t>, scored:<t>)
    streams = {k.decode() for k in client.scan_iter(match=f"{run_id}:*", _type="stream")}
    for stream in sorted(s for s in streams if is_work_stream(s) and s.startswith(f"{run_id}:")):
        for _, fields in client.xrange(stream):
            try:
                queued.add(decode(fields[b"d"]).id)
            except Exception:  # whatever a malformed entry raises, it is not a trajectory of the books
                undecodable += 1
    return queued, undecodable


def _is_scored(stream: str) -> bool:
    """`<run>:scored`, or a teacher's `<run>:scored:<t>`."""
    return is_work_stream(stream) and (stream.endswith(":scored") or ":scored:" in stream)


def run_id_of(out_dir: Path) -> str:
    """From summary.json, or from the resolved config when the launcher ended the run before writing one."""
    if (out_dir / "summary.json").exists():
        return json.loads((out_dir / "summary.json").read_text())["run_id"]
    return yaml.safe_load((out_dir / "config.yaml").read_text())["run"]["run_id"]


def accounting(out_dir: Path, url: str, *, label: str = "") -> dict:
    """The books of a run, by trajectory id, from the components' records and what is left in Redis.

    `label` (a seed, a fault schedule) is appended to the line printed at the end of the session."""
    run_id = run_id_of(out_dir)
    generated: dict[str, float] = {}
    for f in (out_dir / "ledger").glob("actor-*.generated"):
        for line in f.read_text().splitlines():
            tid, when = line.split("\t")[:2]
            generated[tid] = float(when)
    trained = lines(out_dir / "trained_ids.txt")
    stale_lines = lines(out_dir / "ledger" / "learner.dropped_stale")
    stale = set(stale_lines)
    dead_records = (
        [json.loads(x) for x in (out_dir / "dead_letter.jsonl").read_text().splitlines()]
        if (out_dir / "dead_letter.jsonl").exists()
        else []
    )
    dead = {r["trajectory_id"] for r in dead_records if r.get("trajectory_id")}
    # a scored copy the learner's side dead-lettered (its own pending entries, redelivered too often) while
    # the same trajectory was trained: the dead letter is false, and a replay of it would train it again
    dead_scored = {
        r["trajectory_id"]
        for r in dead_records
        if r.get("trajectory_id") and _is_scored(str(r.get("stream", "")))
    }
    queued, undecodable = _queued(redis.Redis.from_url(url), run_id)
    counts = Counter(trained)
    books = {
        "generated": len(generated),
        "trained": len(trained),
        "trained_unique": len(counts),
        "dead_lettered": len(dead_records),
        "dropped_stale": len(stale),
        "dropped_stale_lines": len(stale_lines),  # more than dropped_stale: one id dropped (so scored) twice
        "still_queued": len(queued),
        "queued_undecodable": undecodable,
        "unaccounted": sorted(set(generated) - set(trained) - stale - dead - queued),
        "trained_not_generated": sorted(set(trained) - set(generated)),
        "trained_twice": sorted(i for i, n in counts.items() if n > 1),
        "trained_and_dead_lettered": sorted(dead_scored & set(counts)),
        "trained_and_stale": sorted(stale & set(counts)),
        "generated_at": generated,
    }
    line = (
        "generated {generated} / trained {trained} ({trained_unique} unique) / dead-lettered {dead_lettered} / "
        "dropped as stale {dropped_stale} ({dropped_stale_lines} drops) / still queued {still_queued} / "
        "unaccounted {n} / trained and dead-lettered {dl}"
    ).format(n=len(books["unaccounted"]), dl=len(books["trained_and_dead_lettered"]), **books)
    if label:
        line += f" [{label}]"
    CHAOS_BOOKS.append(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}: {line}")
    books["line"] = line
    return books


def violations(books: dict, excused: Collection[str] = ()) -> list[str]:
    """What breaks exactly-once in `books` (empty when they balance): every generated trajectory trained once or
    accounted for (dead-lettered, dropped as stale, still queued), nothing trained twice, nothing trained that
    no actor generated, no trajectory both trained and dead-lettered or dropped by the learner, and each stale
    trajectory dropped once (a second drop means it was scored twice). `excused`: unaccounted ids a fault was
    allowed to lose (the writes Redis's appendfsync everysec may lose in a crash)."""
    found = []
    books = {**books, "unaccounted": [i for i in books["unaccounted"] if i not in excused]}
    for key, what in (
        ("unaccounted", "generated but neither trained, dead-lettered, dropped as stale nor still queued"),
        ("trained_twice", "trained more than once"),
        ("trained_not_generated", "trained but in no actor's ledger"),
        ("trained_and_dead_lettered", "trained and also dead-lettered by the learner's side"),
        ("trained_and_stale", "trained and also dropped as stale"),
    ):
        if books[key]:
            found.append(f"{len(books[key])} {what}: {books[key][:5]}")
    if books["dropped_stale_lines"] != books["dropped_stale"]:
        found.append(
            f"{books['dropped_stale_lines']} stale drops for {books['dropped_stale']} ids (scored more than once)"
        )
    return found


def component_pid(launcher_pid: int, role: str, index: int | None = None) -> int:
    for pid in children_of(launcher_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if role.encode() in cmd and (index is None or str(index).encode() in cmd[cmd.index(role.encode()) :]):
            return pid
    raise AssertionError(f"no {role} process under launcher {launcher_pid}")
