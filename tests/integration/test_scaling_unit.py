"""The scaling policy and the `opd scale` request, without processes: the decision function is pure, and the
launcher-side scaler is driven through a real zmq broker with a pool that records what it was asked to do."""

from __future__ import annotations

import json

import pytest

from broker import stream_name
from broker.zmq import ZmqBroker
from opd.config import Config, ConfigError, ScalingConfig, load_config
from opd.launch.scaling import (
    CONTROL_GROUP,
    ScaleError,
    ScorerScaler,
    autoscale_decision,
    parse_targets,
    publish_scale,
)
from opd.protocol import pack_control, unpack_control

BAND = ScalingConfig(autoscale=True, min_scorers=1, max_scorers=3, queue_low=4, queue_high=32, cooldown_s=10)


@pytest.mark.parametrize(
    ("current", "depth", "since", "expected"),
    [
        (1, 100.0, 11.0, 2),  # queue above the band: one more
        (3, 100.0, 11.0, None),  # already at max_scorers
        (2, 100.0, 5.0, None),  # inside the cooldown
        (2, 2.0, 11.0, 1),  # queue below the band: one fewer
        (1, 0.0, 11.0, None),  # already at min_scorers
        (2, 16.0, 11.0, None),  # inside the band
        (2, 32.0, 11.0, None),  # the bounds themselves are inside
        (2, 4.0, 11.0, None),
        (0, 0.0, 0.0, 1),  # below min_scorers: restored even inside the cooldown
        (5, 100.0, 0.0, 3),  # above max_scorers: restored even inside the cooldown
    ],
)
def test_autoscale_decision(current, depth, since, expected):
    decision = autoscale_decision(current, depth, BAND, since)
    assert (decision.target if decision else None) == expected


def test_decision_reason_names_the_bound_and_the_depth():
    up = autoscale_decision(1, 40.5, BAND, 60)
    down = autoscale_decision(3, 1.25, BAND, 60)
    assert "40.5" in up.reason and "queue_high=32" in up.reason
    assert "1.2" in down.reason and "queue_low=4" in down.reason


def test_scaling_config_refuses_crossed_bounds():
    with pytest.raises(ConfigError, match="min_scorers .* max_scorers"):
        load_config(None, ["scaling.min_scorers=5", "scaling.max_scorers=2"])
    with pytest.raises(ConfigError, match="queue_low .* must be below"):
        load_config(None, ["scaling.queue_low=50", "scaling.queue_high=10"])


def test_ray_config_refuses_a_local_ray_too_small_for_the_components():
    with pytest.raises(ConfigError, match=r"ray.num_cpus=1 is less .*learner 1 \+ actors 0.5 \+ scorers 0.5"):
        load_config(None, ["ray.num_cpus=1", "scorer.num_scorers=2"])
    assert load_config(None, ["ray.num_cpus=2"]).ray.num_cpus == 2
    # A cluster that is joined has its own size: ray.num_cpus is not checked then.
    assert load_config(None, ["ray.num_cpus=1", "ray.address=auto"]).ray.address == "auto"


def test_parse_targets():
    assert parse_targets(["scorers=3"]) == ({None: 3}, [])
    assert parse_targets(["scorers=2", "broker.request_timeout_s=5"]) == (
        {None: 2},
        ["broker.request_timeout_s=5"],
    )
    for bad, msg in ((["scorers=x"], "whole number"), (["scorers=0"], "at least 1"), (["a.b=1"], "how many")):
        with pytest.raises(ScaleError, match=msg):
            parse_targets(bad)


class RecordingPool:
    """Stands in for the launcher's processes: the scaler's side of the contract is what is tested here."""

    def __init__(self, names):
        self.names, self.started, self.retired = list(names), [], []

    def active_scorers(self):
        return list(self.names)

    def start_scorer(self, index):
        self.started.append(index)
        self.names.append(f"scorer-{index}")

    def retire_scorer(self, name):
        self.retired.append(name)
        self.names.remove(name)

    def reap(self):
        return []


def _cfg(zmq_broker: str, **scaling) -> Config:
    port = int(zmq_broker.rsplit(":", 1)[1])
    return load_config(
        None,
        ["run.run_id=scale-test", f"broker.port={port}", "scorer.num_scorers=1"]
        + [f"scaling.{k}={v}" for k, v in scaling.items()],
    )


def test_scale_requests_reach_the_launcher_without_taking_components_entries(zmq_broker, tmp_path):
    cfg = _cfg(zmq_broker, interval_s=0.5)
    broker = ZmqBroker(zmq_broker)
    control = stream_name("scale-test", "control")
    broker.skip_to_end(control, "scorer-0")  # a component's own group on control, as the scorer makes it
    pool = RecordingPool(["scorer-0"])
    latest = {"scorer-0": {"trajectories_scored": 10}}
    scaler = ScorerScaler(cfg, broker, pool, tmp_path, lambda: latest, lambda _: None)

    publish_scale(cfg, 3)
    scaler.tick()
    assert pool.started == [1, 2] and pool.active_scorers() == ["scorer-0", "scorer-1", "scorer-2"]
    publish_scale(cfg, 2)
    broker.publish(control, [pack_control("weights", version=1)])  # another kind: not the launcher's business
    latest.update({"scorer-0": {"trajectories_scored": 25}, "scorer-2": {"trajectories_scored": 4}})
    scaler.last_interval = (scaler.last_interval[0] - 1.0, {"scorer-0": 10})  # an interval is due
    scaler.tick()
    assert pool.retired == ["scorer-2"]  # the newest goes first

    # The scorer's own group still sees every record, scale ones included (it ignores kinds it does not know).
    kinds = [unpack_control(m.data)["kind"] for m in broker.consume(control, "scorer-0", "scorer-0", 64, 0.0)]
    assert kinds == ["scale", "scale", "weights"]
    assert broker.consume(control, CONTROL_GROUP, "launcher", 64, 0.0) == []

    records = [json.loads(x) for x in (tmp_path / "scaling.jsonl").read_text().splitlines()]
    decisions = [r for r in records if r["event"] == "decision"]
    assert [(d["before"], d["target"], d["source"]) for d in decisions] == [
        (1, 3, "opd scale"),
        (3, 2, "opd scale"),
    ]
    assert all("requested by opd scale" in d["reason"] for d in decisions)
    intervals = [r for r in records if r["event"] == "interval"]
    assert intervals and intervals[-1]["scored"] == {"scorer-0": 15, "scorer-2": 4}
    broker.close()


def test_autoscaler_adds_a_scorer_when_the_queue_is_deep(zmq_broker, tmp_path):
    cfg = _cfg(zmq_broker, autoscale="true", queue_low=1, queue_high=3, cooldown_s=0.01, max_scorers=2)
    broker = ZmqBroker(zmq_broker)
    rollouts = stream_name("scale-test", "rollouts")
    broker.publish(rollouts, [b"x"] * 5)
    pool = RecordingPool(["scorer-0"])
    logged = []
    scaler = ScorerScaler(cfg, broker, pool, tmp_path, dict, logged.append)
    scaler.pools["default"].last_change -= 1.0  # cooldown over
    scaler.tick()
    assert pool.started == [1]
    assert any("autoscaler" in line and "queue_high=3" in line for line in logged)
    scaler.pools["default"].last_change -= 1.0
    scaler.tick()  # at max_scorers: nothing more
    assert pool.started == [1]
    broker.close()


def test_no_scaling_once_the_learner_has_said_stop(zmq_broker, tmp_path):
    """At the end of a run scorers exit on the learner's stop; the autoscaler must not read that as too few."""
    cfg = _cfg(zmq_broker, autoscale="true", queue_low=1, queue_high=3, cooldown_s=0.01, max_scorers=3)
    broker = ZmqBroker(zmq_broker)
    broker.publish(stream_name("scale-test", "rollouts"), [b"x"] * 5)
    pool = RecordingPool(["scorer-0"])
    scaler = ScorerScaler(cfg, broker, pool, tmp_path, dict, lambda _: None)
    broker.publish(stream_name("scale-test", "control"), [pack_control("stop", reason="max_steps")])
    publish_scale(cfg, 3)
    scaler.pools["default"].last_change -= 1.0
    scaler.tick()
    assert pool.started == [] and pool.retired == []
    broker.close()
