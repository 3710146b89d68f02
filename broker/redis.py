"""Durable broker on Redis Streams: what survives a dead worker, and how the work it held comes back.

Delivery is at-least-once: a consumer acknowledges an entry only after its output is published downstream, so a
worker killed mid-batch leaves its entries pending in the group. Before reading new entries, a consumer takes
over entries another consumer left idle for `claim_idle_s` (XPENDING with IDLE, then XCLAIM with the same
minimum idle time, so two claimants cannot both win), and a restarted process under the same name first takes
back what it held. An entry delivered more than `max_deliveries` times is moved to the run's dead_letter stream
with its reason instead of poisoning the group forever, on every path that hands one out again.

Exactly-once needs more than that, because "idle" is not "dead":
- A consumer never takes back an entry this client still holds (delivered, neither acknowledged nor released):
  the learner holds its batch across many reads while it fills, and taking its own entries back gave it the same
  trajectory twice in one step (XAUTOCLAIM did, once a batch took longer than `claim_idle_s` to fill).
- A live consumer keeps what it holds: a keepalive thread refreshes the idle time of held entries (XCLAIM to
  itself with JUSTID, which leaves the delivery count alone) well before `claim_idle_s`, so a slow consumer (a
  large teacher scoring for minutes) is not robbed while alive; once the process dies or is stopped (SIGSTOP),
  the refreshes stop and its entries go to a live consumer. An entry given up on purpose (`release`, a teacher
  failure to retry) is no longer held and comes back after `claim_idle_s` like a dead consumer's.
The learner still deduplicates by trajectory id, for the copies no broker rule can prevent (a scorer killed after
publishing, before acknowledging).

Work streams (rollouts, scored) have one consumer group each, so an acknowledged entry is deleted at once
(XACK + XDEL in one transaction): what remains is exactly what is not done yet, which is also what the
producers' backpressure counts. The length check and the append are one Lua script, so concurrent producers
never take a stream past `max_depth`. Log streams (control, metrics, dead_letter) fan out to a group per reader
and are capped at `log_maxlen` entries instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar
from urllib.parse import urlsplit

import redis
from redis import exceptions as rx

from broker.base import (
    BrokerUnavailable,
    Capabilities,
    Message,
    NoEmbeddedBroker,
    PoisonRecord,
    dead_letter_stream,
    is_work_stream,
    max_message_bytes,
)

STOPPING_TIMEOUT_S = 3.0
KEEPALIVE_FRACTION = 3  # a held entry is refreshed once it is idle for claim_idle_s / 3
RECLAIM_PAGE = 64  # XPENDING page size while looking for entries another consumer left idle

log = logging.getLogger("opd.broker")

# KEYS[1] stream; ARGV[1] max_depth, ARGV[2..] payloads. Appends as many as fit under max_depth, in order, and
# returns their ids ({} when full): one script, so no other producer runs between the length check and the adds.
_PUBLISH_BOUNDED = """
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[1])
local ids = {}
for i = 2, math.min(#ARGV, room + 1) do
  ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'd', ARGV[i])
end
return ids
"""

# KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3..] entry ids. Resets the idle time of the entries this
# consumer still owns (XCLAIM to itself, JUSTID: the delivery count stays) and returns their ids; one another
# consumer took meanwhile is left alone (an XCLAIM alone would take it back), and so is one acknowledged.
_KEEP_HELD = """
local kept = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept[#kept + 1] = ARGV[i]
  end
end
return kept
"""


class BrokerAuthError(PermissionError):
    """Redis refused the user/password of broker.url."""


class NoPoisonRecord(RuntimeError):
    """An entry exceeded max_deliveries but this client was built without `poison_record` to dead-letter it."""


def _is_work(stream: str) -> bool:
    return is_work_stream(stream)


def _dead_letter_stream(stream: str) -> str:
    return dead_letter_stream(stream)


def _sid(raw) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _block_ms(timeout_s: float) -> int | None:
    return int(timeout_s * 1000) if timeout_s > 0 else None


class RedisBroker:
    """Broker interface (broker/base.py) over redis-py; `url` may be redis://, rediss:// (TLS), with user:password.

    `poison_record(source, reason, **fields) -> bytes` builds the dead-letter record of an entry delivered more
    than `max_deliveries` times; without it such an entry raises NoPoisonRecord (it stays pending, nothing lost).
    """

    # The server outlives every component and holds pending entries until acknowledged: a dead consumer's work
    # comes back, dead letters stay until replayed, and any host that reaches the URL can join.
    capabilities: ClassVar[Capabilities] = Capabilities(
        needs_server=True, embedded_process=False, redelivers=True, keeps_dead_letters=True, multi_host=True
    )
    unreachable_hint: ClassVar[str] = "start redis-server or fix broker.url"

    def __init__(
        self,
        url: str,
        *,
        max_depth: int = 256,
        log_maxlen: int = 10000,
        claim_idle_s: float = 30.0,
        max_deliveries: int = 3,
        request_timeout_s: float = 30.0,
        max_message_bytes: int = 64 << 20,
        tls: dict[str, str] | None = None,
        poison_record: PoisonRecord | None = None,
    ):
        self.url, self.max_depth, self.log_maxlen = url, max_depth, log_maxlen
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.max_deliveries, self.max_message_bytes = max_deliveries, max_message_bytes
        self.timeout_s = request_timeout_s
        self.stopping: Callable[[], bool] = lambda: False
        self.poison_record = poison_record
        # One read or connect waits a part of the budget, not all of it: a reply lost in a partition is then asked
        # for again once the link is back, instead of one stalled read spending the whole request_timeout_s.
        attempt_s = min(request_timeout_s, max(5.0, request_timeout_s / 3))
        self.redis = redis.Redis.from_url(
            url, socket_timeout=attempt_s, socket_connect_timeout=attempt_s, **(tls or {})
        )
        self._groups: set[tuple[str, str]] = set()
        self._own_pending_cursor: dict[tuple[str, str, str], str] = {}
        self.redelivered = 0  # entries this client took over from a dead or stuck consumer
        self._publish_bounded = self.redis.register_script(_PUBLISH_BOUNDED)
        self._keep_held = self.redis.register_script(_KEEP_HELD)
        # (stream, group, consumer) -> {entry id: when last delivered or refreshed (monotonic)}: what this client
        # holds on work streams (delivered, neither acknowledged nor released)
        self._held: dict[tuple[str, str, str], dict[str, float]] = {}
        self._held_lock = threading.Lock()
        self._closed = threading.Event()
        self._keepalive: threading.Thread | None = None

    # ------------------------------------------------------------------------------ from the config
    @classmethod
    def from_config(cls, section: Any, **hooks: Any) -> RedisBroker:
        """A client for `broker:` with type redis; hooks: poison_record. The password comes from the URL or from
        `password_file`."""
        tls = (
            ("ssl_ca_certs", section.tls_ca_file),
            ("ssl_certfile", section.tls_cert_file),
            ("ssl_keyfile", section.tls_key_file),
        )
        url = section.url
        password_file = getattr(section, "password_file", None)
        if password_file is not None:  # the password lives in a 0600 file, never in config.yaml or on argv
            from urllib.parse import quote

            try:
                secret = password_file.read_text().strip("\r\n")
            except OSError as exc:
                raise BrokerAuthError(
                    f"broker.password_file {password_file} cannot be read ({exc.strerror}); it holds the Redis "
                    "password (redis.sbatch writes <run dir>/slurm/redis.password)"
                ) from None
            parts = urlsplit(url)
            user = quote(parts.username or "", safe="")
            url = parts._replace(
                netloc=f"{user}:{quote(secret, safe='')}@{parts.netloc.rsplit('@', 1)[-1]}"
            ).geturl()
        return cls(
            url,
            max_depth=section.max_depth,
            log_maxlen=section.control_maxlen,
            claim_idle_s=section.claim_idle_s,
            max_deliveries=section.max_deliveries,
            request_timeout_s=section.request_timeout_s,
            max_message_bytes=max_message_bytes(section),
            tls={k: str(v) for k, v in tls if v is not None},
            poison_record=hooks.get("poison_record"),
        )

    @classmethod
    def serve(cls, section: Any, ready: Callable[[], None] | None = None) -> None:
        raise NoEmbeddedBroker(
            "broker.type: redis has no broker process to start; run redis-server and set broker.url"
        )

    @classmethod
    def address(cls, section: Any) -> str:
        """The URL without its user:password."""
        parts = urlsplit(section.url)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return parts._replace(netloc=netloc).geturl()

    @classmethod
    def resolve(cls, section: Any, free_port: Callable[[], int]) -> None:
        """Nothing to decide: the server and its URL exist before the run."""

    @classmethod
    def missing(cls, section: Any) -> list[str]:
        return []

    # ------------------------------------------------------------------------------ plumbing
    def _call(self, fn, *args, **kwargs):
        """Run one Redis call, retrying a lost connection (Redis restarting) until request_timeout_s, or for a
        few seconds once the component is stopping; then BrokerUnavailable.

        `fn` must be the whole call: redis-py empties a pipeline whose execute failed, so a retried
        `pipe.execute` would send nothing and report success; callers build their pipeline inside `fn`."""
        start = time.monotonic()
        while True:
            try:
                return fn(*args, **kwargs)
            except (
                rx.AuthenticationError,
                rx.AuthorizationError,
                rx.NoPermissionError,
            ) as exc:  # retrying will not help
                raise BrokerAuthError(
                    f"redis at {self._where()} refused the credentials in broker.url ({exc}); "
                    "fix the user:password part of broker.url"
                ) from None
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "SSL" in type(exc.__cause__).__name__:
                    raise BrokerAuthError(
                        f"TLS with redis at {self._where()} failed ({exc}); set broker.tls_ca_file to the CA that "
                        "signed the server's certificate"
                    ) from None
                limit = STOPPING_TIMEOUT_S if self.stopping() else self.timeout_s
                if time.monotonic() - start > limit:
                    raise BrokerUnavailable(f"redis at {self._where()} is unavailable: {exc}") from None
                time.sleep(0.2)
            except redis.ResponseError as exc:
                if "NOGROUP" in str(
                    exc
                ):  # the stream is gone (Redis restarted without its data): re-make groups
                    self._groups.clear()
                raise

    def _where(self) -> str:
        kw = self.redis.connection_pool.connection_kwargs
        return f"{kw.get('host', '?')}:{kw.get('port', '?')}"

    def ping(self) -> None:
        self._call(self.redis.ping)

    def _ensure_group(self, stream: str, group: str) -> None:
        if (stream, group) in self._groups:
            return
        try:
            # id 0: a group created after the first entries still sees them (a scorer may start late)
            self._call(self.redis.xgroup_create, stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add((stream, group))

    # ------------------------------------------------------------------------------ interface
    def publish(self, stream: str, payloads: list[bytes]) -> list[str] | None:
        too_big = [len(p) for p in payloads if len(p) > self.max_message_bytes]
        if too_big:
            raise ValueError(
                f"message of {too_big[0]} bytes exceeds broker.max_message_mb ({self.max_message_bytes} bytes)"
            )
        if _is_work(stream):
            if not payloads:
                return []
            ids = self._call(self._publish_bounded, keys=[stream], args=[self.max_depth, *payloads])
            return [_sid(i) for i in ids] or None  # None: full, the producer waits and retries

        def append() -> list:
            pipe = self.redis.pipeline(transaction=False)
            for data in payloads:
                pipe.xadd(stream, {"d": data}, maxlen=self.log_maxlen, approximate=False)
            return pipe.execute()

        return [_sid(i) for i in self._call(append)]

    def consume(self, stream: str, group: str, consumer: str, count: int, timeout_s: float) -> list[Message]:
        try:
            return self._consume(stream, group, consumer, count, timeout_s)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            return self._consume(stream, group, consumer, count, timeout_s)  # group re-made by _ensure_group

    def _consume(self, stream: str, group: str, consumer: str, count: int, timeout_s: float) -> list[Message]:
        self._ensure_group(stream, group)
        if _is_work(stream):
            key = (stream, group, consumer)
            cursor = self._own_pending_cursor.setdefault(key, "0")
            if cursor != "done":
                # A restarted process under the same consumer name first takes back what it held when it died.
                mine = self._read(stream, group, consumer, count, cursor, None)
                self._own_pending_cursor[key] = mine[-1].id if len(mine) == count else "done"
                # the same rule as for reclaimed entries: one that crashed this consumer max_deliveries times
                # (a poison message re-read after every restart) is dead-lettered, not handed over again
                mine = self._drop_poisoned(stream, group, consumer, [(m.id, m.data) for m in mine])
                if mine:
                    self.redelivered += len(mine)
                    return self._hold(stream, group, consumer, mine)
            claimed = self._reclaim(stream, group, consumer, count)
            if claimed:
                return self._hold(stream, group, consumer, claimed)
            fresh = self._read(stream, group, consumer, count, ">", _block_ms(timeout_s))
            return self._hold(stream, group, consumer, fresh)
        return self._read(stream, group, consumer, count, ">", _block_ms(timeout_s))

    def _read(self, stream, group, consumer, count, start: str, block: int | None) -> list[Message]:
        reply = self._call(self.redis.xreadgroup, group, consumer, {stream: start}, count=count, block=block)
        out = []
        for _name, entries in reply or []:
            for eid, fields in entries:
                if fields:  # an entry deleted while pending reads back empty
                    out.append(Message(_sid(eid), fields[b"d"]))
        return out

    def _reclaim(self, stream: str, group: str, consumer: str, count: int) -> list[Message]:
        """Take over up to `count` entries left idle for claim_idle_s, except the ones this client holds (a
        batch being filled); dead-letter the ones that keep failing."""
        held = self._held_ids(stream, group, consumer)
        idle: list[str] = []
        start = "-"
        while len(idle) < count:
            page = self._call(
                self.redis.xpending_range,
                stream,
                group,
                min=start,
                max="+",
                count=RECLAIM_PAGE,
                idle=self.claim_idle_ms,
            )
            idle += [sid for p in page if (sid := _sid(p["message_id"])) not in held]
            if len(page) < RECLAIM_PAGE:
                break
            start = "(" + _sid(page[-1]["message_id"])  # exclusive: the next page after the last one seen
        if not idle:
            return []
        # the same minimum idle time: an entry its owner refreshed, or another consumer claimed, since the scan
        # is not idle any more and stays where it is
        reply = self._call(self.redis.xclaim, stream, group, consumer, self.claim_idle_ms, idle[:count])
        entries = [(_sid(eid), f[b"d"]) for eid, f in reply if eid is not None and f]
        if len(entries) < len(reply):  # some were deleted while pending: nothing to deliver, forget them
            self._forget_deleted(stream, group, consumer, idle[:count], {sid for sid, _ in entries})
        out = self._drop_poisoned(stream, group, consumer, entries)
        self.redelivered += len(out)
        return out

    def _forget_deleted(
        self, stream: str, group: str, consumer: str, asked: list[str], delivered: set[str]
    ) -> None:
        """Acknowledge the entries just claimed that had no data (deleted while pending): Redis 6.2 keeps
        them in the group's pending list, where every later scan would find them again."""
        mine = self._call(
            self.redis.xpending_range,
            stream,
            group,
            min=asked[0],
            max=asked[-1],
            count=len(asked) * 4,
            consumername=consumer,
        )
        asked_set = set(asked)
        gone = [sid for p in mine if (sid := _sid(p["message_id"])) in asked_set and sid not in delivered]
        if gone:
            self._call(self.redis.xack, stream, group, *gone)

    # ------------------------------------------------------------------------------ what this client holds
    def _held_ids(self, stream: str, group: str, consumer: str) -> set[str]:
        with self._held_lock:
            return set(self._held.get((stream, group, consumer), ()))

    def _hold(self, stream: str, group: str, consumer: str, msgs: list[Message]) -> list[Message]:
        """Remember `msgs` as held by this client (kept fresh until acknowledged or released)."""
        if msgs:
            now = time.monotonic()
            with self._held_lock:
                self._held.setdefault((stream, group, consumer), {}).update((m.id, now) for m in msgs)
            self._start_keepalive()
        return msgs

    def _unhold(self, stream: str, group: str, ids: list[str]) -> None:
        with self._held_lock:
            for (s, g, _c), held in self._held.items():
                if s == stream and g == group:
                    for i in ids:
                        held.pop(i, None)

    def release(self, stream: str, group: str, ids: list[str]) -> None:
        """No longer held: the entries stay pending and come back after claim_idle_s (to any consumer, this
        one included), counted as another delivery."""
        self._unhold(stream, group, ids)

    def _start_keepalive(self) -> None:
        if self._keepalive is None and self.claim_idle_ms > 0 and not self._closed.is_set():
            self._keepalive = threading.Thread(target=self._keep_alive, name="redis-keepalive", daemon=True)
            self._keepalive.start()

    def _keep_alive(self) -> None:
        """Refresh held entries idle for claim_idle_s / KEEPALIVE_FRACTION, until close(). A failure (Redis
        restarting) is tried again next round: the entries are only at risk once claim_idle_s has passed."""
        refresh_s = self.claim_idle_ms / 1000 / KEEPALIVE_FRACTION
        while not self._closed.wait(max(refresh_s / 2, 0.01)):
            try:
                self._refresh(time.monotonic() - refresh_s)
            except Exception as exc:  # a keepalive that dies would hand a live consumer's work away
                log.debug("keepalive of held entries failed (tried again): %s", exc)

    def _refresh(self, older_than: float) -> None:
        with self._held_lock:
            due = {k: [i for i, t in held.items() if t <= older_than] for k, held in self._held.items()}
        for (stream, group, consumer), ids in due.items():
            if not ids:
                continue
            try:
                kept = {_sid(i) for i in self._keep_held(keys=[stream], args=[group, consumer, *ids])}
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                kept = set()  # Redis restarted without its data: nothing is held any more
            now = time.monotonic()
            with self._held_lock:
                held = self._held.get((stream, group, consumer), {})
                for i in ids:
                    if i not in held:
                        continue  # acknowledged or released meanwhile
                    if i in kept:
                        held[i] = now
                    else:  # acknowledged by someone, or taken over (this client was stopped too long)
                        del held[i]

    def _drop_poisoned(
        self, stream: str, group: str, consumer: str, entries: list[tuple[str, bytes]]
    ) -> list[Message]:
        """The entries (just delivered to `consumer`) delivered at most max_deliveries times; the others are
        dead-lettered and acknowledged. Every path that hands out an entry again goes through here."""
        if not entries:
            return []
        pending = self._call(
            self.redis.xpending_range,
            stream,
            group,
            min=entries[0][0],
            max=entries[-1][0],
            count=len(entries) * 4,
            consumername=consumer,
        )
        deliveries = {_sid(p["message_id"]): int(p["times_delivered"]) for p in pending}
        out, poisoned = [], []
        for sid, data in entries:
            if deliveries.get(sid, 1) > self.max_deliveries:
                poisoned.append((sid, data, deliveries[sid]))
            else:
                out.append(Message(sid, data))
        for sid, data, n in poisoned:
            self._dead_letter(stream, group, sid, data, n)
        return out

    def _dead_letter(self, stream: str, group: str, sid: str, data: bytes, deliveries: int) -> None:
        if self.poison_record is None:
            raise NoPoisonRecord(
                f"{stream} entry {sid} was delivered {deliveries} times (broker.max_deliveries="
                f"{self.max_deliveries}) and this client cannot dead-letter it: open the broker with "
                "poison_record (components use opd.runtime.broker.open_broker)"
            )
        record = self.poison_record(
            f"broker/{group}",
            f"failed processing {deliveries - 1} times (broker.max_deliveries={self.max_deliveries})",
            stream=stream,
            message_id=sid,
            size=len(data),
            head=data[:256],
            data=data,
        )
        self.publish(_dead_letter_stream(stream), [record])
        self.ack(stream, group, [sid])

    def ack(self, stream: str, group: str, ids: list[str]) -> None:
        if not ids:
            return
        self._unhold(stream, group, ids)

        def settle() -> list:
            pipe = self.redis.pipeline(transaction=True)
            pipe.xack(stream, group, *ids)
            if _is_work(stream):
                pipe.xdel(stream, *ids)  # one group per work stream: done means gone
            return pipe.execute()

        self._call(settle)

    def skip_to_end(self, stream: str, group: str) -> None:
        self._ensure_group(stream, group)
        self._call(self.redis.xgroup_setid, stream, group, id="$")

    def entries(self, stream: str, count: int = 10000) -> list[tuple[str, bytes]]:
        """Read without consuming (no group involved): for inspection tools."""
        return [(_sid(i), f[b"d"]) for i, f in self._call(self.redis.xrange, stream, count=count) if f]

    def delete(self, stream: str, ids: list[str]) -> None:
        if ids:
            self._call(self.redis.xdel, stream, *ids)

    def drop_group(self, stream: str, group: str) -> None:
        self._groups.discard((stream, group))
        if self._call(
            self.redis.exists, stream
        ):  # XGROUP DESTROY refuses a missing stream, which has no group
            self._call(self.redis.xgroup_destroy, stream, group)  # False when there was no such group: fine

    def depth(self, stream: str) -> int:
        return int(self._call(self.redis.xlen, stream))

    def close(self) -> None:
        self._closed.set()  # what this client holds is no longer kept fresh: a live consumer may take it
        if self._keepalive is not None and self._keepalive is not threading.current_thread():
            self._keepalive.join(1.0)  # one in a call to a dead server gives up on its own (a daemon)
        self.redis.close()
