"""Issue 18's per-teacher view over real endpoints: two teachers' scorers and the learner report through the real
Reporter (real zmq broker, real /metrics HTTP endpoints on the ports `opd run` gives each pool), and `opd top`
reads the same run's metrics stream and queues. The dashboard's queries over a two-pool exporter run on a real
Prometheus in test_dashboards.py; the pure parts are in tests/unit/test_teacher_observability.py.
"""

from __future__ import annotations

import io
import socket

from rich.console import Console

from learner.learner import teacher_shares
from opd.config import Config, load_config
from opd.protocol import Streams
from opd.runtime.prometheus import metrics_port
from tests.conftest import free_port
from tests.integration.test_dashboards import scrape, value
from tests.unit.test_protocol import make

TWO = "teachers={adder: {model: {sft_steps: 10}}, reverser: {model: {sft_steps: 10}}}"
NAMES = ("learner", "scorer-adder-0", "scorer-reverser-0")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _config(tmp_path, zmq_broker: str) -> Config:
    """A two-teacher config on this broker whose learner and first scorer of each pool have free metrics ports
    (the pools' ports are 100 apart: opd.runtime.prometheus POOL_STRIDE)."""
    broker_port = zmq_broker.rsplit(":", 1)[1]
    for _ in range(50):
        base = free_port()
        if base + 200 > 65535:
            continue
        cfg = load_config(
            None,
            [TWO, "routing.default=adder", "run.run_id=tm", f"run.output_dir={tmp_path}",
             f"broker.port={broker_port}", f"metrics.port={base}", "learner.max_steps=10"],
        )  # fmt: skip
        if all(_bindable(metrics_port(cfg, n)) for n in NAMES):
            return cfg
    raise RuntimeError("no free block of metrics ports")


def test_two_pools_report_per_teacher_to_prometheus_and_opd_top(zmq_broker, tmp_path):
    from broker import connect
    from opd.launch.top import run_top
    from opd.runtime.lifecycle import Reporter

    cfg = _config(tmp_path, zmq_broker)
    broker = connect(cfg.broker)
    streams = Streams("tm")
    assert broker.publish(streams.rollouts_for("adder"), [b"r"] * 3)  # adder's pool falls behind
    assert broker.publish(
        streams.scored_for("reverser"), [b"s"] * 2
    )  # reverser's copies wait for the learner
    adder = Reporter(broker, cfg, "scorer-adder-0", 0.0)
    adder.add(trajectories_scored=8, tokens_scored=40, score_seconds=0.4, score_batches=1, score_failures=1)
    adder.add(trajectories_scored=8, tokens_scored=40, score_seconds=0.2, score_batches=1)
    reverser = Reporter(broker, cfg, "scorer-reverser-0", 0.0)
    reverser.add(
        trajectories_scored=16, tokens_scored=96, score_seconds=0.3, score_batches=1, dead_lettered=2
    )
    learner = Reporter(broker, cfg, "learner", 0.0)
    batch = [make(teacher_weights={"adder": 1.0}, teacher_name="adder") for _ in range(3)]
    batch.append(make(teacher_weights={"reverser": 1.0}, teacher_name="reverser"))
    learner.add(trajectories_trained=len(batch), **teacher_shares(batch))
    depths = learner.queue_depths()
    assert depths["rollouts:adder"] == 3 and depths["scored:reverser"] == 2 and depths["rollouts"] == 3
    learner.export_step({"step": 1, **{f"queue_{k}": d for k, d in depths.items()}})
    for r in (adder, reverser):
        r.maybe_send(force=True)
    learner.maybe_send(force=True, step=1)

    a = scrape(metrics_port(cfg, "scorer-adder-0"))
    assert value(a, "opd_tokens_total", teacher="adder", stage="scored") == 80
    assert value(a, "opd_errors_total", teacher="adder", kind="teacher_failure") == 1
    assert value(a, "opd_score_seconds_count", teacher="adder") == 2
    assert value(a, "opd_component_up", teacher="adder") == 1
    r = scrape(metrics_port(cfg, "scorer-reverser-0"))
    assert value(r, "opd_tokens_total", teacher="reverser", stage="scored") == 96
    assert value(r, "opd_dead_letters_total", teacher="reverser") == 2
    assert "adder" not in str(r)  # each endpoint carries its own pool only
    lr = scrape(metrics_port(cfg, "learner"))
    assert value(lr, "opd_teacher_queue_depth", teacher="adder", kind="rollouts") == 3
    assert value(lr, "opd_teacher_queue_depth", teacher="reverser", kind="scored") == 2
    assert value(lr, "opd_teacher_trajectories_trained_total", teacher="adder") == 3
    assert value(lr, "opd_teacher_trajectories_trained_total", teacher="reverser") == 1

    console = Console(file=io.StringIO(), width=200)
    assert run_top(cfg, once=True, console=console) == 0
    rows = {
        cells[1].strip(): [c.strip() for c in cells[2:9]]
        for cells in (line.split("│") for line in console.file.getvalue().splitlines())
        if len(cells) > 9
    }
    # scorers, tok/s, rollouts, scored, batch s, failed, share
    assert rows["adder"][0] == "1" and rows["adder"][2:] == ["3", "0", "0.300", "1", "75.0%"]
    assert rows["reverser"][0] == "1" and rows["reverser"][2:] == ["0", "2", "0.300", "2", "25.0%"]
    broker.close()


def test_a_join_timed_out_without_a_teachers_copy_counts_as_that_teachers_failure(zmq_broker, tmp_path):
    """The learner's real intake: a mixture whose join timed out names the teacher whose copy never came
    (`join_timeouts:<teacher>`, Prometheus' opd_errors_total{kind="join_timeout"}); counted before the
    routing.on_join_timeout branch, so one mode covers both."""
    from broker.zmq import ZmqBroker
    from tests.integration.test_learner_join import _intake, _publish
    from tests.unit.test_join import copies_of

    client = ZmqBroker(zmq_broker, request_timeout_s=10.0)
    try:
        intake, reporter, _ = _intake(
            client, tmp_path, "routing.join_timeout_s=0.2", "routing.on_join_timeout=train_present"
        )
        scored = copies_of({"alpha": 0.2, "beta": 0.3, "gamma": 0.5})
        _publish(client, scored["alpha"], scored["gamma"])
        intake.ack(intake.next_batch(version=3))
        per_teacher = {k: v for k, v in reporter.counters.items() if k.startswith("join_timeouts:")}
        assert per_teacher == {"join_timeouts:beta": 1}
    finally:
        client.close()
