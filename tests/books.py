"""The books of a run, by trajectory id: what was generated (actor ledgers), trained (trained_ids.txt),
dead-lettered, dropped as too stale, and what is still queued in Redis. Shared by every fault test (chaos,
network namespaces) so they all balance the same books."""

from __future__ import annotations

import json
import os
from pathlib import Path

import redis

from opd.protocol import decode
from tests.conftest import CHAOS_BOOKS, children_of


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def accounting(out_dir: Path, url: str) -> dict:
    """The books of a run, by trajectory id, from the components' records and what is left in Redis."""
    run_id = json.loads((out_dir / "summary.json").read_text())["run_id"]
    generated: dict[str, float] = {}
    for f in (out_dir / "ledger").glob("actor-*.generated"):
        for line in f.read_text().splitlines():
            tid, when = line.split("\t")
            generated[tid] = float(when)
    trained = lines(out_dir / "trained_ids.txt")
    stale = set(lines(out_dir / "ledger" / "learner.dropped_stale"))
    dead_records = (
        [json.loads(x) for x in (out_dir / "dead_letter.jsonl").read_text().splitlines()]
        if (out_dir / "dead_letter.jsonl").exists()
        else []
    )
    dead = {r["trajectory_id"] for r in dead_records if r.get("trajectory_id")}
    client = redis.Redis.from_url(url)
    queued = set()
    for stream in ("rollouts", "scored"):
        for _, fields in client.xrange(f"{run_id}:{stream}"):
            queued.add(decode(fields[b"d"]).id)
    books = {
        "generated": len(generated),
        "trained": len(trained),
        "trained_unique": len(set(trained)),
        "dead_lettered": len(dead_records),
        "dropped_stale": len(stale),
        "still_queued": len(queued),
        "unaccounted": sorted(set(generated) - set(trained) - stale - dead - queued),
        "trained_not_generated": sorted(set(trained) - set(generated)),
        "generated_at": generated,
    }
    line = (
        "generated {generated} / trained {trained} ({trained_unique} unique) / dead-lettered {dead_lettered} / "
        "dropped as stale {dropped_stale} / still queued {still_queued} / unaccounted {n}"
    ).format(n=len(books["unaccounted"]), **books)
    CHAOS_BOOKS.append(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}: {line}")
    return books


def component_pid(launcher_pid: int, role: str, index: int | None = None) -> int:
    for pid in children_of(launcher_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if role.encode() in cmd and (index is None or str(index).encode() in cmd[cmd.index(role.encode()) :]):
            return pid
    raise AssertionError(f"no {role} process under launcher {launcher_pid}")
