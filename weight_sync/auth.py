"""Membership of the weight-sync channel needs the run's secret: every value a member writes is signed with it.

The learner's TCPStore has no access control: anyone who reaches its port can read every key (`list_keys`) and
write any. So nothing read from it is trusted for what it says, only for what it proves: each value carries an
HMAC-SHA256 over (the learner's session, its key, its value) under a key derived from the per-run secret, and a
value that does not verify is ignored (and logged by whoever reads it). Binding the key stops a valid value
being copied to another key; binding the session (a random token the learner draws at each start, published
under `session`) stops values recorded in an earlier life of the learner being replayed into this one.

Two things travel further than a signature can reach:
- the rendezvous values of a sync group (each rank's address) are sealed: encrypted with a keystream from the
  secret (HMAC-SHA256 in counter mode) as well as signed (`SealedStore`), so a stranger can neither substitute
  its address for a member's nor read the NCCL bootstrap id;
- gloo's TCP pairs themselves have no authentication (a peer says which pair it is by a sequence number), so
  once a group is formed every rank proves the secret to every other rank over that very connection
  (`prove_members`) before any weight moves: a connection taken over by a stranger fails the proof, and the
  group is dropped. The weights themselves travel unencrypted: on a network others can sniff, run weight sync
  inside a private network or VPN.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist

MAC_BYTES = 32
NONCE_BYTES = 16
MIN_SECRET_BYTES = 16


class Unauthenticated(RuntimeError):
    """A value or a peer did not prove the run's secret."""


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


class Signer:
    """Signs and checks values with the run's secret, bound to the learner's current `session`."""

    def __init__(self, secret: str | bytes, session: str = ""):
        raw = secret.encode() if isinstance(secret, str) else bytes(secret)
        if len(raw) < MIN_SECRET_BYTES:
            raise ValueError(f"the weight-sync secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret, self.session = raw, session
        self._mac_key = _hmac(raw, b"opd weight-sync: signatures")
        self._enc_key = _hmac(raw, b"opd weight-sync: encryption")

    def with_session(self, session: str) -> Signer:
        return Signer(self._secret, session)

    def _mac(self, parts: tuple) -> bytes:
        # json makes the framing unambiguous: ("a,b",) and ("a", "b") sign differently
        return _hmac(self._mac_key, json.dumps([self.session, *parts]).encode())

    def tag(self, *parts: str | int | list) -> str:
        """A hex signature over `parts` (and the session): the `auth` of an announcement."""
        return self._mac(parts).hex()

    def verify(self, tag: object, *parts: str | int | list) -> bool:
        return isinstance(tag, str) and hmac.compare_digest(tag, self.tag(*parts))

    def sign(self, key: str, value: bytes) -> bytes:
        """`value` followed by its signature, bound to `key`."""
        return value + self._mac((key, value.hex()))

    def unsign(self, key: str, raw: bytes) -> bytes | None:
        """The value `sign` wrapped, or None when `raw` is not signed for `key` in this session."""
        if len(raw) < MAC_BYTES:
            return None
        value, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
        return value if hmac.compare_digest(mac, self._mac((key, value.hex()))) else None

    def _keystream(self, nonce: bytes, n: int) -> bytes:
        blocks = (n + 31) // 32
        return b"".join(_hmac(self._enc_key, nonce + i.to_bytes(8, "big")) for i in range(blocks))[:n]

    def seal(self, key: str, value: bytes) -> bytes:
        """Encrypted, then signed: for values a stranger must neither read nor forge."""
        nonce = os.urandom(NONCE_BYTES)
        body = bytes(a ^ b for a, b in zip(value, self._keystream(nonce, len(value)), strict=True))
        return self.sign(key, nonce + body)

    def unseal(self, key: str, raw: bytes) -> bytes | None:
        signed = self.unsign(key, raw)
        if signed is None or len(signed) < NONCE_BYTES:
            return None
        nonce, body = signed[:NONCE_BYTES], signed[NONCE_BYTES:]
        return bytes(a ^ b for a, b in zip(body, self._keystream(nonce, len(body)), strict=True))


def put(store: dist.Store, signer: Signer, key: str, value: str) -> None:
    store.set(key, signer.sign(key, value.encode()))


def fetch(store: dist.Store, signer: Signer, key: str) -> str | None:
    """The signed value at `key`; None when it is absent or not signed with the secret (never blocks)."""
    if not store.check([key]):
        return None
    value = signer.unsign(key, store.get(key))
    return None if value is None else value.decode(errors="replace")


class SealedStore(dist.Store):
    """The store a sync group's backend rendezvouses through: every value is sealed on `set` and must unseal on
    `get`, or the rendezvous fails at once (a forged address never reaches gloo or NCCL)."""

    def __init__(self, inner: dist.Store, signer: Signer, scope: str):
        super().__init__()
        self.inner, self.signer, self.scope = inner, signer, scope

    def _key(self, key: str) -> str:
        return f"{self.scope}/{key}"

    def set(self, key: str, value) -> None:
        self.inner.set(key, self.signer.seal(self._key(key), bytes(value)))

    def get(self, key: str) -> bytes:
        value = self.signer.unseal(self._key(key), self.inner.get(key))
        if value is None:
            raise Unauthenticated(f"rendezvous value {self._key(key)!r} is not sealed with the run's secret")
        return value

    def add(self, key: str, amount: int) -> int:
        return self.inner.add(key, amount)

    def check(self, keys: list[str]) -> bool:
        return self.inner.check(keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        if timeout is None:
            self.inner.wait(keys)
        else:
            self.inner.wait(keys, timeout)

    def delete_key(self, key: str) -> bool:
        return self.inner.delete_key(key)

    def num_keys(self) -> int:
        return self.inner.num_keys()

    def set_timeout(self, timeout: timedelta) -> None:
        self.inner.set_timeout(timeout)


def prove_members(group, rank: int, world_size: int, signer: Signer, label: str, device: str) -> None:
    """Every rank sends every other rank, over their own connection, a signature of (label, from, to), and checks
    the one it got back; a rank that cannot sign (a stranger holding a connection) makes this raise on the rank
    it talks to, before any weight is sent. One all-to-all of 32 bytes per pair, once per group."""
    sent = torch.empty(world_size, MAC_BYTES, dtype=torch.uint8)
    for peer in range(world_size):
        sent[peer] = torch.frombuffer(
            bytearray(bytes.fromhex(signer.tag(label, rank, peer))), dtype=torch.uint8
        )
    got = torch.empty_like(sent)
    sent_d, got_d = sent.to(device), got.to(device)
    group.alltoall_base(got_d, sent_d, [], [], dist.AllToAllOptions()).wait()
    got = got_d.cpu()
    bad = [p for p in range(world_size) if not signer.verify(bytes(got[p].tolist()).hex(), label, p, rank)]
    if bad:
        raise Unauthenticated(
            f"sync group {label}: rank(s) {bad} did not prove the run's secret; group refused"
        )
