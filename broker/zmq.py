"""The embedded broker: one process holding bounded in-memory streams, reached over ZeroMQ.

No server to install, which is what a single-machine run wants. It keeps nothing on disk: if this process dies
the run stops (the Redis broker is the durable choice). Requests are a msgpack header frame plus raw payload
frames; nothing is unpickled.
"""

from __future__ import annotations

import signal
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import zmq

from broker.base import BrokerUnavailable, Capabilities, Message, is_work_stream, max_message_bytes


@dataclass
class _Group:
    cursor: int  # next entry id to deliver
    pending: dict[int, str] = field(default_factory=dict)  # entry id -> consumer


@dataclass
class _Stream:
    bounded: bool
    entries: OrderedDict[int, bytes] = field(default_factory=OrderedDict)
    next_id: int = 0
    groups: dict[str, _Group] = field(default_factory=dict)

    def trim_acked(self) -> None:
        if not self.groups:
            return
        floor = min(min(g.pending) if g.pending else g.cursor for g in self.groups.values())
        while self.entries and next(iter(self.entries)) < floor:
            self.entries.popitem(last=False)

    def trim_to(self, maxlen: int) -> None:
        while len(self.entries) > maxlen:
            self.entries.popitem(last=False)


@dataclass
class _Waiter:
    envelope: list[bytes]
    stream: str
    group: str
    consumer: str
    count: int
    deadline: float


class ZmqBrokerServer:
    """Serves publish/consume/ack/depth on a ROUTER socket; consumes long-poll until data or deadline."""

    def __init__(self, bind: str, max_depth: int, log_maxlen: int, max_message_bytes: int):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes + (1 << 16))
        self.sock.bind(bind)
        self.max_depth, self.log_maxlen = max_depth, log_maxlen
        self.streams: dict[str, _Stream] = {}
        self.waiters: list[_Waiter] = []
        self.stopping = False

    def _stream(self, name: str) -> _Stream:
        s = self.streams.get(name)
        if s is None:
            s = self.streams[name] = _Stream(bounded=is_work_stream(name))
        return s

    def _deliver(self, s: _Stream, group: str, consumer: str, count: int) -> tuple[list[int], list[bytes]]:
        g = s.groups.get(group)
        if g is None:
            g = s.groups[group] = _Group(cursor=next(iter(s.entries), s.next_id))
        ids, payloads = [], []
        for eid, data in s.entries.items():
            if len(ids) >= count:
                break
            if eid >= g.cursor:
                ids.append(eid)
                payloads.append(data)
                g.pending[eid] = consumer
        if ids:
            g.cursor = ids[-1] + 1
        return ids, payloads

    def _reply(self, envelope: list[bytes], header: dict, payloads: list[bytes] = ()) -> None:
        self.sock.send_multipart([*envelope, msgpack.packb(header), *payloads])

    def _handle(self, envelope: list[bytes], header: dict, payloads: list[bytes]) -> None:
        op = header.get("op")
        if op == "ping":
            return self._reply(envelope, {"ok": True})
        name = header.get("stream")
        handler = self._ops.get(op)
        if not isinstance(name, str) or handler is None:
            return self._reply(envelope, {"ok": False, "error": f"bad request: op {op!r}, stream {name!r}"})
        handler(self, envelope, name, self._stream(name), header, payloads)

    def _publish(self, envelope, name: str, s: _Stream, header: dict, payloads: list[bytes]) -> None:
        """Append; a work stream takes as many as fit under max_depth (a prefix), as on Redis, so it never holds
        more. Requests are handled one at a time, so the check and the append are one step."""
        if s.bounded:
            payloads = payloads[: max(self.max_depth - len(s.entries), 0)]
            if not payloads:
                return self._reply(envelope, {"ok": True, "full": True})  # backpressure: the producer retries
        ids = []
        for data in payloads:
            s.entries[s.next_id] = data
            ids.append(s.next_id)
            s.next_id += 1
        if not s.bounded:
            s.trim_to(self.log_maxlen)
        self._reply(envelope, {"ok": True, "ids": ids})
        self._serve_waiters(name)

    def _consume(self, envelope, name: str, s: _Stream, header: dict, payloads: list[bytes]) -> None:
        group, consumer, count = header["group"], header["consumer"], int(header["count"])
        ids, data = self._deliver(s, group, consumer, count)
        if ids or header.get("timeout", 0) <= 0:
            return self._reply(envelope, {"ok": True, "ids": ids}, data)
        deadline = time.monotonic() + header["timeout"]
        self.waiters.append(_Waiter(envelope, name, group, consumer, count, deadline))

    def _ack(self, envelope, name: str, s: _Stream, header: dict, payloads: list[bytes]) -> None:
        g = s.groups.get(header.get("group"))
        if g is not None:
            for eid in header.get("ids", []):
                if g.pending.pop(int(eid), None) is not None and s.bounded:
                    # one group per work stream, as on Redis: done means gone, so the depth that backpressure
                    # counts is exactly the unfinished work (not entries acknowledged behind an older pending one)
                    s.entries.pop(int(eid), None)
            if (
                s.bounded
            ):  # log streams keep their newest log_maxlen entries, as on Redis: a reader that joins
                s.trim_acked()  # later (`opd top`) still sees the recent records the launcher already took
        self._reply(envelope, {"ok": True})

    def _depth(self, envelope, name: str, s: _Stream, header: dict, payloads: list[bytes]) -> None:
        self._reply(envelope, {"ok": True, "depth": len(s.entries)})

    def _skip_to_end(self, envelope, name: str, s: _Stream, header: dict, payloads: list[bytes]) -> None:
        s.groups[header["group"]] = _Group(cursor=s.next_id)
        self._reply(envelope, {"ok": True})

    def _drop_group(self, envelope, name: str, s: _Stream, header: dict, payloads: list[bytes]) -> None:
        if s.groups.pop(header.get("group"), None) is not None and s.bounded:
            s.trim_acked()  # what only the departed group still held is done
        self._reply(envelope, {"ok": True})

    _ops = {
        "publish": _publish,
        "consume": _consume,
        "ack": _ack,
        "depth": _depth,
        "skip_to_end": _skip_to_end,
        "drop_group": _drop_group,
    }

    def _serve_waiters(self, stream: str | None = None) -> None:
        now, keep = time.monotonic(), []
        for w in self.waiters:
            if stream is not None and w.stream != stream:
                keep.append(w)
                continue
            ids, data = self._deliver(self._stream(w.stream), w.group, w.consumer, w.count)
            if ids or now >= w.deadline:
                self._reply(w.envelope, {"ok": True, "ids": ids}, data)
            else:
                keep.append(w)
        self.waiters = keep

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self.stopping:
            timeout_ms = 100
            if self.waiters:
                soonest = min(w.deadline for w in self.waiters) - time.monotonic()
                timeout_ms = max(0, min(timeout_ms, int(soonest * 1000) + 1))
            if poller.poll(timeout_ms):
                frames = self.sock.recv_multipart()
                sep = frames.index(b"")
                envelope, header_raw, payloads = frames[: sep + 1], frames[sep + 1], frames[sep + 2 :]
                try:
                    header = msgpack.unpackb(header_raw, raw=False)
                    if not isinstance(header, dict):
                        raise ValueError("header is not a map")
                    self._handle(envelope, header, payloads)
                except (ValueError, KeyError, TypeError, msgpack.ExtraData) as exc:
                    self._reply(envelope, {"ok": False, "error": f"bad request: {exc}"})
            self._serve_waiters()
        self.sock.close(0)


def serve(bind: str, max_depth: int, log_maxlen: int, max_message_bytes: int, ready=None) -> None:
    server = ZmqBrokerServer(bind, max_depth, log_maxlen, max_message_bytes)

    def _stop(*_):
        server.stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if ready is not None:
        ready()
    server.serve_forever()


STOPPING_TIMEOUT_S = 3.0
_NO_DEAD_LETTERS = (
    "the embedded zmq broker keeps no dead letters after its run: read runs/<id>/dead_letter.jsonl, "
    "or run with broker.type: redis to inspect and replay them"
)


class ZmqBroker:
    """Client side of the embedded broker (one REQ socket; use one client per thread)."""

    # In memory and gone with its process, and the launcher that spawns it is one host's; nothing pending
    # is ever handed to another consumer, so a failure must be dead-lettered by the component itself.
    capabilities: ClassVar[Capabilities] = Capabilities(
        needs_server=False,
        embedded_process=True,
        redelivers=False,
        keeps_dead_letters=False,
        multi_host=False,
    )
    unreachable_hint: ClassVar[str] = "the embedded broker process (opd broker) did not answer"

    @classmethod
    def from_config(cls, section: Any, **hooks: Any) -> ZmqBroker:
        """A client for `broker:` with type zmq. Hooks are accepted and unused: an entry is never redelivered
        here, so none can become poison (poison_record is never called)."""
        return cls(
            f"tcp://{section.host}:{section.port}", section.request_timeout_s, max_message_bytes(section)
        )

    @classmethod
    def serve(cls, section: Any, ready: Callable[[], None] | None = None) -> None:
        serve(
            f"tcp://{section.host}:{section.port}",
            section.max_depth,
            section.control_maxlen,
            max_message_bytes(section),
            ready,
        )

    @classmethod
    def address(cls, section: Any) -> str:
        return f"tcp://{section.host}:{section.port}"

    @classmethod
    def resolve(cls, section: Any, free_port: Callable[[], int]) -> None:
        if section.port == 0:
            section.port = free_port()

    @classmethod
    def missing(cls, section: Any) -> list[str]:
        return ["broker.port"] if section.port == 0 else []

    def __init__(self, address: str, request_timeout_s: float = 30.0, max_message_bytes: int = 64 << 20):
        self.address, self.timeout_s, self.max_message_bytes = address, request_timeout_s, max_message_bytes
        self.stopping: Callable[[], bool] = lambda: False  # set by a component to its stop flag
        self.ctx = zmq.Context.instance()
        self.sock = None
        self._connect()

    def _connect(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.address)

    def _request(
        self, header: dict, payloads: list[bytes] = (), wait_s: float = 0.0
    ) -> tuple[dict, list[bytes]]:
        self.sock.send_multipart([msgpack.packb(header), *payloads], copy=False)
        start, limit = time.monotonic(), self.timeout_s + wait_s
        while not self.sock.poll(250):
            waited = time.monotonic() - start
            # A stopping component should not sit out the full timeout on a broker that is gone.
            if waited > limit or (self.stopping() and waited > STOPPING_TIMEOUT_S + wait_s):
                self._connect()  # a REQ socket is stuck after a lost reply; start afresh
                raise BrokerUnavailable(
                    f"broker at {self.address} did not answer {header.get('op')} within {waited:.0f}s"
                )
        frames = self.sock.recv_multipart()
        reply = msgpack.unpackb(frames[0], raw=False)
        if not reply.get("ok"):
            raise RuntimeError(f"broker refused {header.get('op')}: {reply.get('error')}")
        return reply, frames[1:]

    def ping(self) -> None:
        self._request({"op": "ping"})

    def publish(self, stream: str, payloads: list[bytes]) -> list[str] | None:
        too_big = [len(p) for p in payloads if len(p) > self.max_message_bytes]
        if too_big:
            raise ValueError(
                f"message of {too_big[0]} bytes exceeds broker.max_message_mb ({self.max_message_bytes} bytes)"
            )
        reply, _ = self._request({"op": "publish", "stream": stream}, payloads)
        return None if reply.get("full") else [str(i) for i in reply["ids"]]

    def consume(self, stream: str, group: str, consumer: str, count: int, timeout_s: float) -> list[Message]:
        header = {
            "op": "consume",
            "stream": stream,
            "group": group,
            "consumer": consumer,
            "count": count,
            "timeout": timeout_s,
        }
        reply, frames = self._request(header, wait_s=timeout_s)
        return [Message(str(i), d) for i, d in zip(reply["ids"], frames, strict=True)]

    def ack(self, stream: str, group: str, ids: list[str]) -> None:
        if ids:
            self._request({"op": "ack", "stream": stream, "group": group, "ids": [int(i) for i in ids]})

    def release(self, stream: str, group: str, ids: list[str]) -> None:
        """Nothing to do: this broker never redelivers, so a released entry stays pending (the component
        dead-letters what it cannot finish, capabilities.redelivers being False)."""

    def depth(self, stream: str) -> int:
        return int(self._request({"op": "depth", "stream": stream})[0]["depth"])

    def skip_to_end(self, stream: str, group: str) -> None:
        self._request({"op": "skip_to_end", "stream": stream, "group": group})

    def drop_group(self, stream: str, group: str) -> None:
        self._request({"op": "drop_group", "stream": stream, "group": group})

    def entries(self, stream: str, count: int = 10000) -> list[tuple[str, bytes]]:
        raise NotImplementedError(_NO_DEAD_LETTERS)

    def delete(self, stream: str, ids: list[str]) -> None:
        raise NotImplementedError(_NO_DEAD_LETTERS)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
