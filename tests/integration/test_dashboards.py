"""Prometheus endpoints, the port formula, the Grafana/Prometheus deploy files, `opd top` and wandb/TensorBoard.

Fast tests: real HTTP endpoints, a real zmq broker process, real tracker files; no model is built. The end-to-end
scrape of a whole `opd run` is in test_dashboards_e2e.py.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from opd.config import Config, load_config
from opd.runtime.prometheus import exported_series, metrics_port, port_map
from tests.conftest import REPO, free_port, opd

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "opd-stream.json"
PROMETHEUS_YML = REPO / "deploy" / "prometheus" / "prometheus.yml"


def free_port_block(n: int) -> int:
    """A base port with the n ports from it free (the learner, actor and scorer take base, +1, +2)."""
    for _ in range(50):
        base = free_port()
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports")


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """name -> {sorted labels: value} from a real /metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(series: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    want = set(labels.items())
    hits = [v for k, v in series.get(name, {}).items() if want <= set(k)]
    assert hits, f"{name}{labels} not exported; have {sorted(series)}"
    return sum(hits)


# ----------------------------------------------------------------------------------------------- ports
def test_port_formula_is_deterministic_and_never_collides():
    cfg = load_config(None, ["metrics.port=9400", "actor.num_actors=3", "scorer.num_scorers=2"])
    launched = port_map(cfg)
    assert launched == {
        "learner": 9400,
        "actor-0": 9401,
        "actor-1": 9402,
        "actor-2": 9403,
        "scorer-0": 9404,
        "scorer-1": 9405,
    }
    # scorers added by `opd scale`/--index and actors started by hand beyond actor.num_actors
    extra = [f"scorer-{j}" for j in range(2, 40)] + [f"actor-{i}" for i in range(3, 40)]
    ports = [metrics_port(cfg, n) for n in [*launched, *extra]]
    assert len(set(ports)) == len(ports)
    assert metrics_port(cfg, "actor-3") == 9399 and metrics_port(cfg, "scorer-7") == 9411


def test_metrics_off_and_fixed_layout():
    assert metrics_port(Config(), "learner") is None and port_map(Config()) == {}
    fixed = load_config(None, ["metrics.port=9400", "metrics.port_layout=fixed", "actor.num_actors=1"])
    assert {metrics_port(fixed, n) for n in ("learner", "actor-5", "scorer-3")} == {9400}
    with pytest.raises(ValueError, match="port_layout=offset"):
        port_map(fixed)  # `opd run` puts them all on one host: refused
    with pytest.raises(ValueError, match="outside 1024-65535"):
        metrics_port(load_config(None, ["metrics.port=65535"]), "scorer-0")


def test_privileged_metrics_port_is_refused_with_the_fix():
    from opd.config import ConfigError

    with pytest.raises(ConfigError, match=r"metrics\.port.*9400"):
        load_config(None, ["metrics.port=80"])


# ------------------------------------------------------------------------------------- exporter + Reporter
def _cfg(tmp_path: Path, broker_address: str, base: int) -> Config:
    port = int(broker_address.rsplit(":", 1)[1])
    return load_config(
        None,
        [
            f"metrics.port={base}",
            "run.run_id=dash",
            f"run.output_dir={tmp_path}",
            f"broker.port={port}",
            "learner.max_staleness=2",
        ],
    )


def test_reporter_feeds_prometheus_counters_gauges_histograms(zmq_broker, tmp_path):
    from broker import connect
    from opd.runtime.lifecycle import Reporter

    base = free_port_block(2)
    cfg = _cfg(tmp_path, zmq_broker, base)
    broker = connect(cfg.broker)
    assert broker.publish("dash:rollouts", [b"a", b"b", b"c"])  # queue depth the learner reads
    learner = Reporter(broker, cfg, "learner", 0.0)
    learner.add(trajectories_trained=8, tokens_trained=40, dropped_stale=1)
    depths = learner.queue_depths()  # what the learner writes into each step record (metrics.jsonl too)
    assert depths == {"rollouts": 3, "scored": 0}
    learner.export_step(
        {
            **{f"queue_{kind}": d for kind, d in depths.items()},
            "step": 1,
            "weight_version": 1,
            "reverse_kl": 0.75,
            "loss": 0.1,
            "step_seconds": 0.2,
            "wait_seconds": 0.6,
            "lag_histogram": [50_000, 20_000, 10_000],  # response tokens per lag
            "weight_sync_seconds": 0.01,
            "weight_sync_gbps": 1.5,
            "skipped_steps": 2,
            "eval_accuracy": 0.5,
        }
    )
    learner.add(trajectories_trained=8, tokens_trained=40)
    s = scrape(base)
    assert value(s, "opd_trajectories_total", stage="trained", component="learner") == 16
    assert value(s, "opd_tokens_total", stage="trained") == 80
    assert value(s, "opd_dropped_stale_total") == 1
    assert value(s, "opd_queue_depth", stream="rollouts") == 3
    assert value(s, "opd_queue_depth", stream="scored") == 0
    assert value(s, "opd_reverse_kl") == 0.75 and value(s, "opd_eval_accuracy") == 0.5
    assert value(s, "opd_weight_version", component="learner") == 1
    assert value(s, "opd_learner_wait_fraction") == pytest.approx(0.75)
    assert value(s, "opd_errors_total", kind="skipped_step") == 2
    # lag histogram: 50k tokens at lag 0, 20k at 1, 10k at 2 (cumulative buckets)
    assert value(s, "opd_lag_versions_bucket", le="0.0") == 50_000
    assert value(s, "opd_lag_versions_bucket", le="1.0") == 70_000
    assert value(s, "opd_lag_versions_bucket", le="+Inf") == 80_000
    assert value(s, "opd_lag_versions_count") == 80_000 and value(s, "opd_lag_versions_sum") == 40_000
    assert value(s, "opd_weight_sync_seconds_count") == 1
    # an actor's endpoint (base + 1) carries its own stage, and no learner-only series
    actor = Reporter(broker, cfg, "actor-0", 10.0)
    actor.add(trajectories_generated=32, tokens_generated=160, dead_lettered=2)
    actor.maybe_send(weight_version=4)
    a = scrape(base + 1)
    assert value(a, "opd_trajectories_total", stage="generated", component="actor-0") == 32
    assert value(a, "opd_dead_letters_total") == 2 and value(a, "opd_weight_version") == 4
    assert "opd_reverse_kl" not in a and "opd_learner_wait_fraction" not in a
    broker.close()


def test_metrics_off_serves_nothing(zmq_broker, tmp_path):
    from broker import connect
    from opd.runtime.lifecycle import Reporter

    cfg = _cfg(tmp_path, zmq_broker, 0)
    reporter = Reporter(connect(cfg.broker), cfg, "learner", 0.0)
    assert reporter.exporter is None
    reporter.add(trajectories_trained=1)
    reporter.export_step({"step": 1})


# --------------------------------------------------------------------------------- Grafana and Prometheus
def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_every_metric_the_dashboard_queries_is_exported():
    exprs = _dashboard_exprs()
    used = {m for e in exprs for m in re.findall(r"\bopd_[a-z0-9_]+", e)}
    assert len(used) >= 10
    missing = used - exported_series()
    assert not missing, f"the dashboard queries series no exporter produces: {sorted(missing)}"


def test_dashboard_covers_the_issue_panels_and_its_datasource_is_provisioned():
    dash = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for topic in (
        "per stage",
        "queue",
        "lag",
        "utilisation",
        "weight sync",
        "kl",
        "accuracy",
        "dead letters",
        "per teacher",
        "share of trajectories",
    ):
        assert topic in titles, topic
    ids = [p["id"] for p in dash["panels"]]
    assert len(set(ids)) == len(ids)
    prov = REPO / "deploy" / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and ds["type"] == "prometheus"
    assert {p["datasource"]["uid"] for p in dash["panels"]} == {ds["uid"]}
    provider = yaml.safe_load((prov / "dashboards" / "opd-stream.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_scrapes_every_replica_of_the_compose_services():
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {j["job_name"]: j["dns_sd_configs"][0] for j in cfg["scrape_configs"]}
    assert set(jobs) == {"learner", "actor", "teacher-scorer", "teacher-scorer-2"}
    for name, sd in jobs.items():
        assert sd == {**sd, "names": [name], "type": "A", "port": 9400}
    promtool = shutil.which("promtool")
    if promtool:  # Debian's `prometheus` package; validates the file as Prometheus itself reads it
        done = subprocess.run(
            [promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------- opd top
TOP_RECORDS = [
    {"component": "actor-0", "uptime": 1.0, "trajectories_generated": 32, "tokens_generated": 100},
    {"component": "actor-0", "uptime": 3.0, "trajectories_generated": 96, "tokens_generated": 300},
    {"component": "scorer-0", "uptime": 2.0, "trajectories_scored": 64, "tokens_scored": 200},
    {
        "component": "learner",
        "uptime": 4.0,
        "step": 7,
        "weight_version": 6,
        "loss": 0.25,
        "reverse_kl": 0.4321,
        "staleness_mean": 1.5,
        "staleness_max": 3,
        "time": 100.0,
        "wait_seconds": 0.3,
        "step_seconds": 0.1,
        "eval_accuracy": 0.625,
        "trajectories_trained": 448,
        "tokens_trained": 1400,
    },
]


@pytest.fixture(params=["zmq", "redis"])
def run_broker(request, tmp_path):
    """(client, the overrides that point a config at it) for a real broker of each kind."""
    from broker import connect

    if request.param == "zmq":
        port = int(request.getfixturevalue("zmq_broker").rsplit(":", 1)[1])
        overrides = [f"broker.port={port}"]
    else:
        overrides = ["broker.type=redis", f"broker.url={request.getfixturevalue('redis_server').url}"]
    client = connect(load_config(None, overrides).broker)
    yield client, overrides
    client.close()


def test_opd_top_once_reads_the_stream_without_taking_the_launchers_records(run_broker, tmp_path):
    from opd.protocol import pack_control

    client, overrides = run_broker
    client.publish("toprun:metrics", [pack_control("metrics", **r) for r in TOP_RECORDS])
    client.publish("toprun:rollouts", [b"x"] * 5)
    # as in `opd run`: the launcher's group exists from the start and has read (and acknowledged) some records
    first = client.consume("toprun:metrics", "launcher", "launcher", 2, 1.0)
    client.ack("toprun:metrics", "launcher", [m.id for m in first])
    args = ["run.run_id=toprun", *overrides, f"run.output_dir={tmp_path}", "learner.max_steps=50"]
    proc = opd("top", "--config", str(REPO / "configs" / "tiny.yaml"), "--once", *args, env=_wide_env())
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "7/50" in out and "0.432" in out and "0.625" in out and "0.75" in out  # wait 0.3 / (0.3 + 0.1)
    row = next(line for line in out.splitlines() if "actor-0" in line)
    assert "32.0" in row and "100" in row  # (96 - 32) / 2 s and (300 - 100) / 2 s: both actor records seen
    assert re.search(r"\b5\b", out.splitlines()[-2])  # rollouts depth
    # top reads under a group of its own: the launcher's group still gets the two records it had not read
    rest = client.consume("toprun:metrics", "launcher", "launcher", 100, 1.0)
    assert len(first) == 2 and len(rest) == 2
    if hasattr(client, "redis"):  # and it leaves no consumer group behind on Redis
        assert [g["name"] for g in client.redis.xinfo_groups("toprun:metrics")] == [b"launcher"]


def test_opd_top_on_a_finished_run_whose_broker_is_gone(tmp_path):
    records = [
        {"step": i, "weight_version": i, "time": 10.0 + i, "tokens": 320, "trajectories": 64, "lag_histogram": [300, 20],
         "reverse_kl": 1.0 / i, "loss": 0.1, "wait_seconds": 0.5, "step_seconds": 0.5, "staleness_mean": 0.1}
        for i in range(1, 4)
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"trajectories_generated": 300, "trajectories_scored": 250, "wall_seconds": 20.0}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    args = [
        "run.run_id=gone",
        f"broker.port={free_port()}",
        f"run.output_dir={tmp_path}",
        "learner.max_steps=3",
    ]
    proc = opd("top", "--config", str(REPO / "configs" / "tiny.yaml"), "--once", *args, env=_wide_env())
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "broker gone" in out and "3/3" in out and "0.333" in out and "finished" in out
    assert "300" in out and "250" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("│ learner"))
    assert "64.0" in row and "320" in row  # 64 trajectories and 320 tokens per 1 s step


def _wide_env() -> dict[str, str]:
    import os

    return {**os.environ, "COLUMNS": "200"}


# ------------------------------------------------------------------------------------- wandb, TensorBoard
def _step_records(n: int) -> list[dict]:
    return [
        {"step": i, "time": 1.0 * i, "reverse_kl": 2.0 / i, "loss": 0.5 + i, "eval_accuracy": 0.1 * i,
         "lag_histogram": [3, 1], "replayed": False}
        for i in range(1, n + 1)
    ]  # fmt: skip


def test_tensorboard_event_files_hold_our_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from opd.runtime.tracking import StepTracker

    cfg = load_config(
        None, [f"run.output_dir={tmp_path}", "run.run_id=tb", "metrics.tensorboard.enabled=true"]
    )
    tracker = StepTracker(cfg)
    for r in _step_records(4):
        tracker.log(r)
    tracker.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"reverse_kl", "loss", "eval_accuracy"} <= tags and "replayed" not in tags and "time" not in tags
    kl = acc.Scalars("reverse_kl")
    assert [e.step for e in kl] == [1, 2, 3, 4]
    assert [e.value for e in kl] == pytest.approx([2.0, 1.0, 2 / 3, 0.5])


def wandb_history(run_dir: Path) -> list[dict[str, str]]:
    """History rows of an offline run, read from its .wandb file: a LevelDB-style log of protobuf records
    (7-byte file header `:W&B` magic version; 32 KiB blocks of records: crc32, length, type, payload)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data, pos, chunks, rows, exited = path.read_bytes(), 7, [], [], False
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(b"".join(chunks))
            chunks = []
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                rows.append({i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item})
            exited = exited or kind == "exit"
    assert exited, f"{path} has no exit record: the run was not finished"
    return rows


def test_wandb_offline_writes_a_run_with_our_keys(tmp_path):
    from opd.runtime.tracking import StepTracker

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.run_id=wb1", "metrics.wandb.enabled=true"])
    tracker = StepTracker(cfg)
    for r in _step_records(3):
        tracker.log(r)
    tracker.close()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*-wb1")
    rows = wandb_history(run_dir)
    assert [int(r["_step"]) for r in rows] == [1, 2, 3]
    assert [float(r["reverse_kl"]) for r in rows] == pytest.approx([2.0, 1.0, 2 / 3])
    assert all({"loss", "eval_accuracy"} <= set(r) and "lag_histogram" not in r for r in rows)


def test_missing_tracker_package_names_the_extra(tmp_path, monkeypatch):
    import sys

    from opd.runtime.tracking import StepTracker

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "metrics.wandb.enabled=true"])
    with pytest.raises(ImportError, match=r"\.\[logging\].*metrics\.wandb\.enabled=false"):
        StepTracker(cfg)


# ---------------------------------------------------------------------------- the dashboard in a real Prometheus
def _prometheus_query(port: int, expr: str) -> dict:
    import urllib.parse

    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return json.loads(urllib.request.urlopen(url, timeout=5).read())
    except urllib.error.HTTPError as exc:  # a bad query is a 400 with the parser's message
        return json.loads(exc.read())
    except (urllib.error.URLError, ConnectionError):  # not listening yet
        return {}


def _feed(exporter, step: int) -> None:
    exporter.add({"trajectories_trained": 64, "tokens_trained": 320, "dead_lettered": 1, "dropped_stale": 1,
                  "trajectories_trained:adder": 40, "trajectories_trained:reverser": 24,
                  "join_timeouts:reverser": 1})  # fmt: skip
    exporter.step(
        {"step": step, "weight_version": step, "reverse_kl": 1.0 / step, "loss": 0.2, "eval_accuracy": 0.5,
         "step_seconds": 0.05, "wait_seconds": 0.02, "lag_histogram": [40, 20, 4], "weight_sync_seconds": 0.01,
         "weight_sync_gbps": 2.0, "weight_sync_members": 1, "skipped_steps": step, "importance_weight": 1.0,
         "staleness_mean": 0.4, "learner_ranks": 2, "rank_step_seconds": [0.05, 0.04], "rank_tokens": [320, 300],
         "rank_token_imbalance": 1.03, "rank_comm_seconds": [0.01, 0.008], "rank_apply_seconds": [0.002, 0.002]},
        {"rollouts": 7, "scored": 3, "rollouts:adder": 5, "rollouts:reverser": 2, "scored:adder": 1,
         "scored:reverser": 2},
    )  # fmt: skip


def test_every_dashboard_query_runs_on_a_real_prometheus_scraping_our_exporter(tmp_path):
    """Prometheus (Debian's `prometheus` package) scrapes a live exporter; each panel's PromQL must parse and
    return series. Skipped, saying so, where the package is missing (.ci/run installs it)."""
    from opd.runtime.prometheus import Exporter

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary: apt-get install --no-install-recommends prometheus")
    exporter = Exporter("learner", max_staleness=2, teachers=("adder", "reverser"))
    # the other components' series, as their own endpoints would show them: an actor and two teachers' scorers
    exporter.trajectories.labels(component="actor-0", teacher="", stage="generated").inc(64)
    exporter.weight_version.labels("actor-0").set(1)
    for name, teacher in (("scorer-adder-0", "adder"), ("scorer-reverser-0", "reverser")):
        for family in (exporter.trajectories, exporter.tokens):
            family.labels(component=name, teacher=teacher, stage="scored").inc(64)
        exporter.weight_version.labels(name).set(1)
        exporter.errors.labels(component=name, teacher=teacher, kind="teacher_failure").inc()
        exporter.dead_letters.labels(component=name, teacher=teacher).inc()
        exporter.score_seconds.labels(name, teacher).observe(0.2)
        exporter.up.labels(name, teacher).set(1)
    target = free_port()
    assert exporter.serve("127.0.0.1", target)
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "learner", "static_configs": [{"targets": [f"127.0.0.1:{target}"]}]}
                ],
            }
        )
    )
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline, step = time.monotonic() + 60, 0
        while time.monotonic() < deadline:  # feed between scrapes until rate() has points to work with
            step += 1
            _feed(exporter, step)
            time.sleep(0.5)
            query = "count_over_time(opd_learner_step[1m])"  # scrapes so far: rate() needs two or more
            up = _prometheus_query(prom_port, query) if proc.poll() is None else {}
            result = up.get("data", {}).get("result", []) if up.get("status") == "success" else []
            if result and float(result[0]["value"][1]) >= 3:
                break
        else:
            pytest.fail("Prometheus did not scrape the exporter within 60 s")
        for expr in _dashboard_exprs():
            reply = _prometheus_query(prom_port, expr)
            assert reply.get("status") == "success", f"{expr}: {reply.get('error')}"
            assert reply["data"]["result"], f"{expr} returned no series"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
