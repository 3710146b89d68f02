"""A write in flight when Redis dies: whatever the client reports done is in Redis once it is back, or the call
raises. redis-py empties a pipeline whose execute failed, so a client that retried `pipe.execute` sent nothing
and reported success: an acknowledgement undone, a weight announcement lost (found by the random chaos test)."""

from __future__ import annotations

import threading
import time

import pytest
import redis
import redis.connection

from broker import BrokerUnavailable
from broker.redis import RedisBroker
from tests.conftest import RedisServer, wait_for


def _kill_server_mid_write(monkeypatch, server: RedisServer, down_s: float) -> list[bool]:
    """The next command redis-py sends (a pipeline, a script, a single call) finds the server dead (killed with
    the command on the wire), and the server comes back `down_s` later on the same port and AOF: a real crash at
    the worst moment, timed by hand. Returns a flag that turns False once the crash has happened."""
    armed = [True]
    original = redis.connection.AbstractConnection.send_packed_command

    def dying(self, command, check_health=True):
        if armed[0]:
            armed[0] = False
            server.kill()
            threading.Thread(target=lambda: (time.sleep(down_s), server.start()), daemon=True).start()
        return original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", dying)
    return armed


@pytest.mark.parametrize("op", ["publish work", "publish log", "ack"])
def test_a_write_in_flight_when_redis_dies_is_done_or_raises(op, tmp_path, monkeypatch):
    """Whatever a client call reports done must be in Redis once it is back (AOF: nothing acknowledged is lost
    when only the process dies); a call that cannot finish within broker.request_timeout_s must raise."""
    server = RedisServer(tmp_path, appendonly=True)
    try:
        client = RedisBroker(server.url, request_timeout_s=20)
        if op == "ack":
            client.publish("r:rollouts", [b"a", b"b"])
            ids = [m.id for m in client.consume("r:rollouts", "g", "c", 10, 0.1)]
        client.ping()  # connected: the crash hits the write itself, not the connection handshake
        armed = _kill_server_mid_write(monkeypatch, server, down_s=2.0)
        try:
            if op == "ack":
                client.ack("r:rollouts", "g", ids)
            else:
                stream = "r:rollouts" if op == "publish work" else "r:dead_letter"
                sent = client.publish(stream, [b"x", b"y"])
        except BrokerUnavailable:
            return  # reported, so the caller knows: allowed
        assert not armed[0], "the crash never happened: the test exercised nothing"
        wait_for(lambda: server.proc.poll() is None and _answers(server), 30, "redis back")
        check = redis.Redis.from_url(server.url)
        if op == "ack":
            assert check.xpending("r:rollouts", "g")["pending"] == 0 and check.xlen("r:rollouts") == 0
        else:
            assert sent is not None and len(sent) == 2 and check.xlen(stream) == 2, (sent, check.xlen(stream))
    finally:
        server.stop()


def _answers(server: RedisServer) -> bool:
    try:
        return bool(redis.Redis.from_url(server.url, socket_connect_timeout=1).ping())
    except redis.ConnectionError:
        return False


class _Blackhole:
    """A TCP relay to redis-server that can swallow every byte both ways (a partition: no reset, no reply), as a
    cut link does to a connection that is already open."""

    def __init__(self, port: int):
        import socket

        self.target, self.swallow = port, threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            client, _ = self.listener.accept()
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst) -> None:
        try:
            while data := src.recv(65536):
                if not self.swallow.is_set():
                    dst.sendall(data)
        except OSError:
            pass


def test_a_reply_lost_in_a_partition_is_asked_for_again_within_the_budget(redis_server):
    """One read waits a part of broker.request_timeout_s, so a call whose request vanished in a partition shorter
    than the budget is retried after the link is back (the netns harness found a learner stopped by a partition
    shorter than its request_timeout_s: one stalled read had spent the whole budget)."""
    relay = _Blackhole(int(redis_server.url.rsplit(":", 1)[1].split("/")[0]))
    client = RedisBroker(f"redis://127.0.0.1:{relay.port}/0", request_timeout_s=12)
    client.ping()
    relay.swallow.set()
    threading.Timer(3.0, relay.swallow.clear).start()  # the link comes back after 3 s
    start = time.monotonic()
    assert client.publish("r:control", [b"after the partition"])  # raised BrokerUnavailable at 12 s before
    assert time.monotonic() - start < 11
    assert redis.Redis.from_url(redis_server.url).xlen("r:control") == 1
