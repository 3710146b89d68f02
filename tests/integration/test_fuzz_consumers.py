"""Fuzz: thousands of mutated valid messages through each consumer's real handling path (decode, the learner's
intake and collate over a real broker, the scorer's handle with a real teacher). Nothing may raise out of a
consumer, and the books balance: every message ends trained/scored once or dead-lettered (or, at the learner,
skipped as a duplicate id).

The generator is seeded (hypothesis is not a dependency): byte-level damage (bit flips, inserted, deleted,
duplicated spans, truncation) and field-level damage to the msgpack map (wrong types, huge and negative ints,
NaN and inf, hostile strings, huge or wrapping shapes, wrong dtypes, foreign top-k widths, out-of-vocabulary ids)."""

from __future__ import annotations

import math
import random
import time

import msgpack
import numpy as np
import pytest

from learner.batching import collate
from opd.protocol import ProtocolError, Streams, Trajectory, decode, encode, unpack_control
from tests.integration.test_learner_intake import RUN_ID, _intake, client, scored
from tests.unit.test_protocol import VOCAB

__all__ = ["client"]

HOSTILE = [
    None, True, False, 0, -1, 1, 2**31, 2**62, 2**63, 2**64 - 1, -(2**63), math.nan, math.inf, -math.inf,
    -0.0, 1e308, 5e-324, "", "a\nb", "x" * 300, "\x00", "ok", b"", b"\xff" * 9, [], [1, 2], {}, {"a": 1},
    {"dtype": "<i4", "shape": [2**63], "data": b""}, [[1, 2], [3]],
]  # fmt: skip
ARRAYS = ("prompt_token_ids", "response_token_ids", "behaviour_logprobs", "token_versions", "teacher_logprobs",
          "teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprobs")  # fmt: skip


def _bases(rng: random.Random, scored_: bool) -> list[bytes]:
    """Valid messages of every shape our producers send (with and without rewards, token versions, tails)."""
    out = []
    for i in range(12):
        n, k = rng.randint(1, 6), rng.choice([2, 2, 3])
        kw = dict(
            prompt_token_ids=np.array([rng.randrange(VOCAB) for _ in range(rng.randint(1, 5))], np.int32),
            response_token_ids=np.array([rng.randrange(VOCAB) for _ in range(n)], np.int32),
            behaviour_logprobs=-np.random.default_rng(i).random(n, dtype=np.float32),
            teacher_logprobs=-np.random.default_rng(i + 1).random(n, dtype=np.float32),
            teacher_topk_ids=np.array([[rng.randrange(VOCAB) for _ in range(k)] for _ in range(n)], np.int32),
            teacher_topk_logprobs=-np.random.default_rng(i + 2).random((n, k), dtype=np.float32),
            reward=float(i % 2) if i % 3 else None,
            # a streaming actor's: started under policy_version, later tokens by newer weights
            token_versions=np.sort(np.random.default_rng(i).integers(0, 3, n)).astype(np.int32)
            if i % 4 == 0
            else None,
            teacher_tail_logprobs=np.full(n, -5.0, np.float32) if i % 5 == 0 else None,
            group_id=f"g{i % 3}",
        )
        if kw["token_versions"] is not None:
            kw["policy_version"] = int(kw["token_versions"][0])
        if not scored_:
            kw.update(teacher_logprobs=None, teacher_topk_ids=None, teacher_topk_logprobs=None,
                      teacher_tail_logprobs=None, teacher_temperature=None)  # fmt: skip
        out.append(encode(scored(**kw)))
    return out


def _bytes_damage(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    op = rng.randrange(5)
    i = rng.randrange(len(b))
    if op == 0:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op == 1:
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif op == 2:
        del b[i : i + rng.randint(1, 8)]
    elif op == 3:
        b[i:i] = b[i : i + rng.randint(1, 16)]
    else:
        b = b[:i]
    return bytes(b)


def _array_damage(rng: random.Random, arr: dict) -> None:
    op = rng.randrange(6)
    if op == 0:
        arr["shape"] = rng.choice(
            [[2**63], [4, 2**63], [4, 2**62], [-1], [2**31, 2**31], [True], ["3"], None]
        )
    elif op == 1:
        arr["dtype"] = rng.choice(["<f8", ">i4", "<i8", "|b1", "O", 3])
    elif op == 2:
        arr["data"] = arr["data"][: rng.randrange(len(arr["data"]) + 1)]
    elif op == 3:
        dt = np.dtype(arr["dtype"])
        bad = np.array([math.nan, math.inf, 1.0, 1e9]) if dt.kind == "f" else np.array([-1, VOCAB, 2**31 - 1])
        vals = np.frombuffer(arr["data"], dtype=dt).copy()
        if vals.size:
            vals.flat[rng.randrange(vals.size)] = rng.choice(list(bad))
            arr["data"] = vals.astype(dt).tobytes()
    elif op == 4:  # a consistent array of another width or length: passes the byte check
        shape = list(arr["shape"]) if isinstance(arr["shape"], list) else [1]
        shape[-1] = rng.choice([0, 1, 3, 5])
        dt = np.dtype(arr["dtype"])
        arr.update(shape=shape, data=np.zeros(shape, dtype=dt).tobytes())
    else:
        arr[rng.choice(["extra", "data", "shape"])] = rng.choice(HOSTILE)


def _field_damage(rng: random.Random, data: bytes) -> bytes:
    msg = msgpack.unpackb(data, raw=False)
    for _ in range(rng.randint(1, 3)):
        name = rng.choice([*msg, "unknown", "task", "timestamps"])
        if name in ARRAYS and isinstance(msg.get(name), dict) and rng.random() < 0.7:
            try:
                _array_damage(rng, msg[name])
            except (TypeError, ValueError, KeyError):  # damaged twice: the first damage broke the map
                msg[name] = rng.choice(HOSTILE)
        elif name in ("task", "timestamps") and rng.random() < 0.6:
            msg[name] = {rng.choice(["answer", "generated", "x\n"]): rng.choice(HOSTILE)}
        elif rng.random() < 0.15:
            msg.pop(name, None)
        else:
            msg[name] = rng.choice(HOSTILE)
    return msgpack.packb(msg, use_bin_type=True)


def mutations(seed: int, count: int, scored_: bool = True) -> list[bytes]:
    """`count` messages: about a third left valid (so the consumers' good path runs too), the rest damaged."""
    rng = random.Random(seed)
    bases = _bases(rng, scored_)
    out = []
    for _ in range(count):
        data = rng.choice(bases)
        r = rng.random()
        if r < 0.3:
            data = encode(_fresh(decode(data)))  # valid, with a fresh id
        elif r < 0.6:
            data = _bytes_damage(rng, data)
        else:
            data = _field_damage(rng, data)
        out.append(data)
    return out


def _fresh(t: Trajectory) -> Trajectory:
    import uuid

    t.id = uuid.uuid4().hex
    return t


def test_decode_raises_nothing_but_protocol_errors():
    ok = bad = 0
    for data in mutations(seed=1, count=20000):
        try:
            decode(data, vocab_size=VOCAB, require_scored=True)
            ok += 1
        except ProtocolError:
            bad += 1
        try:
            unpack_control(data)
        except ProtocolError:
            pass
    assert ok > 500 and bad > 3000  # both paths were exercised


@pytest.mark.parametrize("needs_topk", [True, False], ids=["topk-loss", "no-topk-loss"])
def test_the_learners_intake_and_collate_survive_and_balance_the_books(client, tmp_path, needs_topk):
    """Chunks of mutated messages through the learner's loop body (next_batch, collate, ack) on a real broker.
    Each chunk ends with one valid message, so the batch fills only once the whole chunk was consumed."""
    intake, reporter = _intake(
        client, tmp_path, "learner.batch_size=4096", "scorer.topk=2", needs_topk=needs_topk
    )
    stream = Streams(RUN_ID).scored
    trained: list[str] = []
    published = 0
    messages = mutations(seed=2 + needs_topk, count=3000)
    deadline = time.monotonic() + 60
    for start in range(0, len(messages), 15):
        chunk = [*messages[start : start + 15], encode(_fresh(decode(_bases(random.Random(0), True)[0])))]
        expected = set()
        for data in chunk:  # the oracle for when the chunk is consumed: what the contract admits, by id
            try:
                expected.add(intake.contract.check(data).id)
            except ProtocolError:
                pass
        expected -= set(trained)
        assert client.publish(stream, chunk) is not None
        published += len(chunk)
        intake.cfg = intake.cfg.model_copy(update={"batch_size": len(expected)})
        batch = intake.next_batch(version=0)
        made = intake.collate(batch, lambda ts: collate(ts, pad_id=0))
        if made is not None:
            assert made.size == len(batch)
        trained.extend(t.id for t in batch.trajectories)
        intake.trained = set(trained)
        intake.ack(batch)
        assert time.monotonic() < deadline, "the fuzz run took too long"
    c = reporter.counters
    assert len(trained) == len(set(trained))  # nothing trained twice
    assert published == len(trained) + c.get("dead_lettered", 0) + c.get("duplicates_skipped", 0)
    assert c.get("dead_lettered", 0) > 300 and len(trained) > 200
    assert client.consume(stream, Streams.LEARNER_GROUP, Streams.LEARNER_GROUP, 10, 0.2) == []


def test_the_scorers_handling_survives_and_balances_the_books(quick_models, zmq_broker):
    """Mutated rollouts through `Scorer.handle` (validate, score with the real teacher, check the top-k width,
    publish, acknowledge) on a real broker that never redelivers: every rollout ends scored once or
    dead-lettered, and every scored copy is one the learner's decode accepts."""
    from opd.config import load_config
    from opd.runtime.lifecycle import StopFlag
    from teacher_scorers.scorer import Scorer
    from tests.conftest import TINY

    port = int(zmq_broker.rsplit(":", 1)[1])
    cfg = load_config(
        TINY,
        [
            *quick_models,
            f"broker.port={port}",
            "run.run_id=fuzz-scorer",
            "scorer.topk=2",
            "scorer.batch_size=8",
        ],
    )
    scorer = Scorer(cfg, 0, StopFlag())
    broker = scorer.broker
    published, scored_ids, deadline = 0, [], time.monotonic() + 120
    messages = mutations(seed=7, count=1500, scored_=False)
    for start in range(0, len(messages), 16):
        chunk = messages[start : start + 16]
        assert broker.publish(scorer.rollouts, chunk) is not None
        published += len(chunk)
        taken = 0
        while taken < len(chunk):
            msgs = broker.consume(scorer.rollouts, Streams.SCORERS_GROUP, scorer.name, 8, 2.0)
            assert msgs, "published rollouts did not come back"
            taken += len(msgs)
            assert scorer.handle(msgs)
            out = broker.consume(scorer.scored, "learner", "learner", 64, 0.0)
            for m in out:
                t = decode(m.data, vocab_size=scorer.vocab_size, require_scored=True)
                assert t.teacher_topk_ids.shape[1] == 2
                scored_ids.append(t.id)
            broker.ack(scorer.scored, "learner", [m.id for m in out])
        assert time.monotonic() < deadline, "the fuzz run took too long"
    c = scorer.reporter.counters
    assert published == c.get("trajectories_scored", 0) + c.get("dead_lettered", 0)
    assert len(scored_ids) == c.get("trajectories_scored", 0) > 200 and c.get("dead_lettered", 0) > 500
    assert broker.consume(scorer.rollouts, Streams.SCORERS_GROUP, scorer.name, 8, 0.2) == []
