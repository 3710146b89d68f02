"""Each broker's declared Capabilities are facts: checked here against what the broker really does.

Parametrized over the registry, so a broker added to BROKERS must say here how to reach a test server of its
own (SERVED) and where nothing serves it (UNSERVED), and then meets the same checks."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

import broker
from broker import BROKERS, BrokerUnavailable, NoEmbeddedBroker
from opd.config import load_config
from opd.protocol import dead_letter_record, unpack_control
from tests.conftest import REPO, free_port

CLAIM_IDLE_S = 0.2


def _section(overrides: list[str]):
    return load_config(None, overrides).broker


# broker type -> the config overrides of a client to the test server that the fixture started
SERVED = {
    "zmq": lambda request: ["broker.port=" + request.getfixturevalue("zmq_broker").rsplit(":", 1)[1]],
    "redis": lambda request: [
        "broker.type=redis",
        f"broker.url={request.getfixturevalue('redis_server').url}",
        f"broker.claim_idle_s={CLAIM_IDLE_S}",
    ],
}
# broker type -> the overrides of an address where nothing runs yet
UNSERVED = {
    "zmq": lambda port: [f"broker.port={port}"],
    "redis": lambda port: ["broker.type=redis", f"broker.url=redis://127.0.0.1:{port}/0"],
}


def test_every_registered_broker_has_its_test_servers_here():
    assert set(SERVED) == set(BROKERS) == set(UNSERVED)


@pytest.fixture(params=sorted(BROKERS))
def section(request):
    """The `broker:` section of a config whose broker is running (a real server process)."""
    return _section(SERVED[request.param](request))


def test_redelivers_means_an_unacknowledged_entry_comes_back(section):
    dies = broker.connect(section)
    lives = broker.connect(section)
    dies.publish("r:rollouts", [b"held"])
    assert [m.data for m in dies.consume("r:rollouts", "scorers", "scorer-0", 1, 0.1)] == [b"held"]
    dies.close()  # scorer-0 dies without acknowledging
    time.sleep(CLAIM_IDLE_S * 2)
    back = [m.data for m in lives.consume("r:rollouts", "scorers", "scorer-1", 1, 0.2)]
    assert back == ([b"held"] if broker.capabilities(section).redelivers else [])


def test_keeps_dead_letters_means_they_can_be_listed_and_deleted(section):
    client = broker.connect(section)
    record = dead_letter_record("scorer-0", "teacher raised", stream="r:rollouts", data=b"t")
    client.publish("r:dead_letter", [record])
    if not broker.capabilities(section).keeps_dead_letters:
        with pytest.raises(NotImplementedError, match="dead_letter.jsonl"):
            client.entries("r:dead_letter")
        return
    later = broker.connect(section)  # another process, e.g. `opd dead-letter ls` after the run
    [(entry_id, data)] = later.entries("r:dead_letter")
    assert unpack_control(data)["reason"] == "teacher raised"
    later.delete("r:dead_letter", [entry_id])
    assert later.entries("r:dead_letter") == []


def test_drop_group_forgets_the_groups_cursor(section):
    """A reader that leaves for good (opd top) leaves no group behind: the same name starts afresh."""
    client = broker.connect(section)
    client.publish("r:metrics", [b"m1", b"m2"])
    seen = client.consume("r:metrics", "top-1", "top-1", 10, 0.1)
    client.ack("r:metrics", "top-1", [m.id for m in seen])
    assert client.consume("r:metrics", "top-1", "top-1", 10, 0.1) == []
    client.drop_group("r:metrics", "top-1")
    assert [m.data for m in client.consume("r:metrics", "top-1", "top-1", 10, 0.1)] == [b"m1", b"m2"]
    client.drop_group("r:never-written", "top-1")  # no stream, no group: nothing to do


@pytest.mark.parametrize("kind", sorted(BROKERS))
def test_needs_server_and_embedded_process_say_whether_opd_alone_brings_it_up(kind):
    """With no outside server: `opd broker`'s serve() makes a working broker iff it is embedded; a broker that
    needs a server stays unreachable, and both refusals name the fix."""
    overrides = UNSERVED[kind](free_port())
    section = _section(overrides)
    caps = broker.capabilities(section)
    assert caps.needs_server != caps.embedded_process  # something must run it: opd or an outside server
    code = (
        "import sys; from opd.config import load_config; from broker import serve; "
        "serve(load_config(None, sys.argv[1:]).broker)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *overrides],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if caps.embedded_process:
            client = broker.wait_ready(section, within_s=20, alive=lambda: proc.poll() is None)
            assert client.publish("r:rollouts", [b"x"]) is not None and client.depth("r:rollouts") == 1
            proc.terminate()
            assert proc.wait(10) == 0  # SIGTERM is a clean stop
        else:
            hint = broker.broker_type(section).unreachable_hint
            with pytest.raises(BrokerUnavailable, match=re.escape(hint)):
                broker.wait_ready(section, within_s=2, alive=lambda: proc.poll() is None)
            assert proc.wait(20) != 0 and "NoEmbeddedBroker" in proc.stderr.read()
            with pytest.raises(NoEmbeddedBroker, match=r"set broker\.\w+"):  # names the setting to fix
                broker.serve(section)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_multi_host_brokers_are_servers_of_their_own():
    """Components on another host cannot reach a broker that lives and dies with one host's launcher."""
    for kind in BROKERS:
        caps = broker.capabilities(_section(UNSERVED[kind](1)))
        assert not caps.multi_host or (caps.needs_server and not caps.embedded_process), kind
