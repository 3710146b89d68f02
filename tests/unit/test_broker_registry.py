"""The broker registry: one line per broker, each class with the whole contract; and broker/ imports nothing
of the project (its place in the layers: transport below every component)."""

from __future__ import annotations

import ast
import inspect
import sys
from types import SimpleNamespace

import pytest

import broker
from broker import BROKERS, Capabilities, UnknownBroker
from broker.base import Broker, BrokerType
from opd.config import load_config
from tests.conftest import REPO


def _section(*overrides: str):
    return load_config(None, list(overrides)).broker


def _project_packages() -> set[str]:
    """Top-level names importable from the repository: its folders with Python files, and its modules."""
    names = {p.stem for p in REPO.glob("*.py")}
    names |= {p.name for p in REPO.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    return names


def test_broker_imports_nothing_of_the_project():
    project = _project_packages() - {"broker"}
    assert {"opd", "actors", "learner", "teacher_scorers", "weight_sync"} <= project
    found = []
    for path in sorted((REPO / "broker").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            found += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in project]
    assert found == []


def test_an_unknown_broker_type_names_the_known_ones():
    kafka = SimpleNamespace(type="kafka")
    for call in (broker.connect, broker.capabilities, broker.serve, broker.address, broker.missing):
        with pytest.raises(UnknownBroker, match="'zmq', 'redis'.*BROKERS"):
            call(kafka)


def test_registering_is_lazy():
    """Choosing a broker imports only its own module (a zmq run never loads redis-py)."""
    import subprocess

    code = (
        "import sys, broker; from types import SimpleNamespace as S; "
        "broker.capabilities(S(type='zmq')); print('broker.redis' in sys.modules, 'redis' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def _members(protocol) -> set[str]:
    names = {n for n, v in vars(protocol).items() if callable(v) or isinstance(v, classmethod)}
    return {n for n in names | set(protocol.__annotations__) if not n.startswith("_")}


# broker type -> overrides of a section whose client can be built without a server (clients connect lazily)
OFFLINE = {"zmq": ["broker.port=1"], "redis": ["broker.type=redis"]}


@pytest.mark.parametrize("kind", sorted(BROKERS))
def test_every_broker_class_has_the_whole_contract(kind):
    assert set(OFFLINE) == set(BROKERS)
    cls = broker.broker_type(SimpleNamespace(type=kind))
    assert isinstance(cls.capabilities, Capabilities) and cls.unreachable_hint
    client = broker.connect(_section(*OFFLINE[kind]))
    try:
        assert isinstance(client, cls)
        missing = [n for n in _members(Broker) if not hasattr(client, n)]
        missing += [n for n in _members(BrokerType) if not hasattr(cls, n)]
        assert missing == []
        for name in _members(Broker) - set(Broker.__annotations__):  # the contract's call signatures
            assert list(inspect.signature(getattr(cls, name)).parameters) == list(
                inspect.signature(getattr(Broker, name)).parameters
            ), name
    finally:
        client.close()


def test_capabilities_fields_are_the_agreed_ones():
    """Other parts of the tree code against exactly these names."""
    assert list(Capabilities.__dataclass_fields__) == [
        "needs_server",
        "embedded_process",
        "redelivers",
        "keeps_dead_letters",
        "multi_host",
    ]


def test_zmq_from_config_maps_the_section():
    section = _section(
        "broker.host=127.0.0.2", "broker.port=5555", "broker.request_timeout_s=7", "broker.max_message_mb=2"
    )
    client = broker.connect(section)  # a REQ socket connects lazily: no server needed to build the client
    try:
        assert (client.address, client.timeout_s, client.max_message_bytes) == (
            "tcp://127.0.0.2:5555",
            7.0,
            2 << 20,
        )
        assert broker.address(section) == "tcp://127.0.0.2:5555"
    finally:
        client.close()


def test_redis_from_config_maps_the_section(tmp_path):
    ca = tmp_path / "ca.crt"
    section = _section(
        "broker.type=redis",
        "broker.url=rediss://user:pw@10.0.0.1:6380/2",
        "broker.max_depth=9",
        "learner.batch_size=9",
        "broker.control_maxlen=99",
        "broker.claim_idle_s=1.5",
        "broker.max_deliveries=4",
        "broker.request_timeout_s=3",
        "broker.max_message_mb=1",
        f"broker.tls_ca_file={ca}",
    )
    seen = []
    client = broker.connect(section, poison_record=lambda *a, **k: seen.append(a) or b"")
    kw = client.redis.connection_pool.connection_kwargs
    assert (kw["host"], kw["port"], kw["db"], kw["password"], kw["ssl_ca_certs"]) == (
        "10.0.0.1",
        6380,
        2,
        "pw",
        str(ca),
    )
    assert (client.max_depth, client.log_maxlen, client.claim_idle_ms, client.max_deliveries) == (
        9,
        99,
        1500,
        4,
    )
    assert (client.timeout_s, client.max_message_bytes) == (3.0, 1 << 20)
    client.poison_record("broker/g", "why")
    assert seen == [("broker/g", "why")]
    assert broker.address(section) == "rediss://10.0.0.1:6380/2"  # no password in messages


def test_resolve_and_missing_decide_the_zmq_port_once():
    section = _section()
    assert broker.missing(section) == ["broker.port"]  # `opd actor` by hand cannot guess it
    broker.resolve(section, lambda: 41234)
    assert section.port == 41234 and broker.missing(section) == []
    broker.resolve(section, lambda: 1)  # decided already: kept
    assert section.port == 41234
    redis = _section("broker.type=redis")
    broker.resolve(redis, lambda: 1)
    assert broker.missing(redis) == [] and redis.url == "redis://127.0.0.1:6379/0"


def test_open_broker_passes_the_protocols_dead_letter_record_and_the_stop_flag():
    from opd.protocol import dead_letter_record
    from opd.runtime.broker import open_broker

    stop = SimpleNamespace(flag=False)
    client = open_broker(_section("broker.type=redis"), stopping=lambda: stop.flag)
    assert client.poison_record is dead_letter_record
    stop.flag = True
    assert client.stopping() is True
