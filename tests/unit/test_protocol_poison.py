"""Messages that stopped consumers in the issue-14 fault campaign: each is now one ProtocolError (a dead letter),
never another exception and never a value a consumer would act on."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from opd.protocol import ProtocolError, decode, unpack_control
from tests.unit.test_protocol import VOCAB, _mutate, _set_array, make


def _huge_topk(m):
    # The campaign's message: 4 * 2**63 wraps to 0 in int64, so 0 bytes "fit" the old size check and numpy
    # then raised ValueError("Maximum allowed dimension exceeded"), which no consumer caught.
    m["teacher_topk_ids"].update(shape=[4, 2**63], data=b"")


def _wrapping_shape(m):
    # 4 * 2**62 also wraps to 0, with every dimension a valid int64
    m["teacher_topk_ids"].update(shape=[4, 2**62], data=b"")
    m["teacher_topk_logprobs"].update(shape=[4, 2**62], data=b"")


POISON = {
    "topk dim 2**63": (_huge_topk, "shape"),
    "shape product wraps in int64": (_wrapping_shape, "shape"),
    "NaN behaviour_temperature": (
        lambda m: m.update(behaviour_temperature=math.nan),
        "behaviour_temperature",
    ),
    "zero behaviour_temperature": (lambda m: m.update(behaviour_temperature=0.0), "behaviour_temperature"),
    "negative teacher_temperature": (lambda m: m.update(teacher_temperature=-1.0), "teacher_temperature"),
    "inf teacher_temperature": (lambda m: m.update(teacher_temperature=math.inf), "teacher_temperature"),
    "policy_version 2**63": (lambda m: m.update(policy_version=2**63), "policy_version"),
    "policy_version 2**62": (lambda m: m.update(policy_version=2**62), "policy_version"),
    "negative sample_index": (lambda m: m.update(sample_index=-1), "sample_index"),
    "NaN reward": (lambda m: m.update(reward=math.nan), "reward"),
    "id with a newline": (lambda m: m.update(id="abc\ndef"), "id"),
    "empty id": (lambda m: m.update(id=""), "id"),
    "overlong prompt_id": (lambda m: m.update(prompt_id="p" * 4097), "prompt_id"),
    "prompt_id with a newline": (lambda m: m.update(prompt_id="q\n1"), "prompt_id"),
    "group_id with a tab": (lambda m: m.update(group_id="g\t1"), "group_id"),
    "run_id with a control character": (lambda m: m.update(run_id="r\x00"), "run_id"),
    "overlong finish_reason": (lambda m: m.update(finish_reason="x" * 65), "finish_reason"),
    "task value a list": (lambda m: m.update(task={"answer": [1, 2]}), "task"),
    "task too many entries": (lambda m: m.update(task={str(i): "x" for i in range(65)}), "task"),
    "timestamp a string": (lambda m: m.update(timestamps={"generated": "now"}), "timestamps"),
    "timestamp NaN": (lambda m: m.update(timestamps={"generated": math.nan}), "timestamps"),
    "bool shape": (lambda m: m["response_token_ids"].update(shape=[True]), "shape"),
    "teacher_id with a newline": (lambda m: m.update(teacher_id="a\nb"), "teacher_id"),
}


@pytest.mark.parametrize("case", list(POISON), ids=list(POISON))
def test_a_poison_field_is_a_protocol_error_naming_it(case):
    fn, reason = POISON[case]
    with pytest.raises(ProtocolError, match=reason):
        decode(_mutate(fn), vocab_size=VOCAB)


def test_the_bounds_admit_what_our_producers_send():
    t = make(
        behaviour_temperature=0.7,
        teacher_temperature=1.0,
        policy_version=2**62 - 1,
        reward=-1.0,
        teacher_id="/cache/teacher model/v1",
        task={"answer": "12", "level": 3},
        prompt_id="question 12 (gsm8k: my train.jsonl)",
    )
    from opd.protocol import encode

    got = decode(encode(t), vocab_size=VOCAB)
    assert got.policy_version == 2**62 - 1 and got.teacher_id == t.teacher_id and got.task == t.task


def test_an_unforeseen_exception_inside_decode_becomes_a_protocol_error():
    # a payload that is not bytes at all: len() works, msgpack would raise TypeError
    with pytest.raises(ProtocolError):
        decode("not bytes", vocab_size=VOCAB)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        decode(_mutate(lambda m: _set_array(m, "teacher_topk_ids", np.zeros((3, 2, 1), dtype=np.int32))))


def test_unpack_control_raises_only_protocol_errors():
    for data in (b"", b"\xc1", msgpack.packb([1]), msgpack.packb({"kind": 3}), "str", None):
        with pytest.raises(ProtocolError):
            unpack_control(data)  # type: ignore[arg-type]
