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
