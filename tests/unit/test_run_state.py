"""The launcher's books of what components report, per incarnation: a restarted component starts its counters
at 0 under a new incarnation, so totals are sums over incarnations and rates (status line, `opd top`) are taken
within one and are never negative. The issue's numbers: summary.json said 11,648 generated where the ledgers held
15,552, and the status line showed `tok/s gen -167`."""

from __future__ import annotations

from opd.launch.monitor import RunState, rate
from opd.launch.top import TopState


def rec(component: str, inc: str, seq: int, uptime: float = 1.0, **counters: float) -> dict:
    return {
        "kind": "metrics",
        "component": component,
        "incarnation": inc,
        "seq": seq,
        "uptime": uptime,
        "counters": sorted(counters),
        **counters,
    }


def test_totals_are_sums_over_incarnations_after_restarts():
    state = RunState()
    state.ingest(rec("actor-0", "a", 1, trajectories_generated=100, tokens_generated=500), now=1.0)
    state.ingest(rec("actor-0", "a", 2, trajectories_generated=300, tokens_generated=1500), now=2.0)
    state.ingest(
        rec("actor-0", "b", 1, trajectories_generated=40, tokens_generated=200), now=3.0
    )  # restarted
    state.ingest(rec("actor-1", "c", 5, trajectories_generated=7, tokens_generated=35), now=3.0)
    assert state.totals("trajectories_generated", "actor") == 300 + 40 + 7
    assert state.totals("tokens_generated", "actor") == 1500 + 200 + 35
    assert state.totals("trajectories_scored", "scorer") == 0
    latest = state.latest
    assert latest["actor-0"]["trajectories_generated"] == 340 and latest["actor-0"]["incarnations"] == 2
    assert latest["actor-0"]["incarnation"] == "b" and latest["actor-1"]["incarnations"] == 1


def test_a_late_older_record_changes_nothing_and_gauges_survive_heartbeats():
    state = RunState()
    state.ingest({**rec("actor-0", "a", 3, trajectories_generated=30), "weight_version": 4}, now=1.0)
    state.ingest(rec("actor-0", "a", 2, trajectories_generated=20), now=2.0)  # a heartbeat sent before, late
    state.ingest({**rec("actor-0", "a", 4, trajectories_generated=30), "heartbeat": True}, now=3.0)
    assert state.totals("trajectories_generated", "actor") == 30
    assert state.latest["actor-0"]["weight_version"] == 4  # a heartbeat without it does not erase it


def test_records_without_incarnation_count_as_one_process_as_before():
    state = RunState()
    state.ingest({"component": "actor-0", "tokens_generated": 100}, now=1.0)
    state.ingest({"component": "actor-0", "tokens_generated": 150}, now=2.0)
    state.ingest({"component": "actor-1", "tokens_generated": 50}, now=2.0)
    assert state.totals("tokens_generated", "actor") == 200


def test_status_rates_per_incarnation_never_negative_across_a_restart():
    state = RunState()
    state.ingest(rec("actor-0", "a", 1, tokens_generated=1000), now=1.0)
    before = state.counts("tokens_generated", "actor")
    state.ingest(rec("actor-0", "b", 1, tokens_generated=167), now=2.0)  # the old process died at 1000
    after = state.counts("tokens_generated", "actor")
    # the old way (newest record per component) would read (167 - 1000) / 10 = -83.3 tok/s
    assert rate(before, after, 10.0) == 16.7
    state.ingest(rec("actor-0", "b", 2, tokens_generated=367), now=3.0)
    assert rate(after, state.counts("tokens_generated", "actor"), 2.0) == 100.0
    assert rate({("x", "y"): 5.0}, {("x", "y"): 3.0}, 1.0) == 0.0  # a counter that went back counts nothing
    assert rate(before, after, 0.0) == 0.0


def test_liveness_from_recent_non_final_records():
    state = RunState()
    state.ingest(rec("scorer-0", "a", 1), now=100.0)
    state.ingest(rec("scorer-1", "b", 1), now=100.0)
    state.ingest({**rec("scorer-1", "b", 2), "final": True}, now=101.0)  # stopped cleanly
    state.ingest(rec("scorer-2", "c", 1), now=90.0)  # silent for 15 s
    state.ingest(rec("actor-0", "d", 1), now=100.0)
    live = state.live("scorer", now=105.0, liveness_s=10.0)
    assert [i.component for i in live] == ["scorer-0"]
    assert state.live("scorer", now=111.0, liveness_s=10.0) == []


def test_top_rates_restart_with_the_incarnation_and_totals_add_up():
    top = TopState()
    for up, n in ((1.0, 10), (5.0, 50), (9.0, 90)):
        top.ingest(rec("actor-0", "a", int(up), uptime=up, trajectories_generated=n))
    assert top.rate("actor-0", "trajectories_generated") == 10.0
    top.ingest(
        rec("actor-0", "b", 1, uptime=2.0, trajectories_generated=6)
    )  # restarted: uptime and counts reset
    top.ingest(rec("actor-0", "a", 99, uptime=9.5, trajectories_generated=95))  # the old one's last, late
    top.ingest(rec("actor-0", "b", 2, uptime=4.0, trajectories_generated=16))
    assert top.rate("actor-0", "trajectories_generated") == 5.0  # within the new incarnation only
    assert top.total("actor-0", "trajectories_generated") == 95 + 16
    top.ingest(rec("actor-0", "b", 1, uptime=2.0, trajectories_generated=6))  # a late heartbeat: ignored
    assert top.rate("actor-0", "trajectories_generated") == 5.0
