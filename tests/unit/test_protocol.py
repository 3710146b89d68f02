import msgpack
import numpy as np
import pytest

from opd.protocol import SCHEMA_VERSION, ProtocolError, Trajectory, decode, encode

VOCAB = 16


def make(**kw) -> Trajectory:
    base = dict(
        run_id="r",
        prompt_id="p",
        group_id="g",
        sample_index=0,
        prompt_token_ids=np.array([1, 5, 6], dtype=np.int32),
        response_token_ids=np.array([7, 8, 2], dtype=np.int32),
        behaviour_logprobs=np.array([-0.1, -1.0, -0.01], dtype=np.float32),
        policy_version=3,
        teacher_logprobs=np.array([-0.2, -0.3, -0.0], dtype=np.float32),
        teacher_topk_ids=np.array([[7, 8], [8, 7], [2, 3]], dtype=np.int32),
        teacher_topk_logprobs=np.array([[-0.2, -2.0], [-0.3, -1.5], [0.0, -9.0]], dtype=np.float32),
    )
    base.update(kw)
    return Trajectory(**base)


def raw(t: Trajectory) -> dict:
    return msgpack.unpackb(encode(t), raw=False)


def test_round_trip_keeps_every_field():
    t = make(token_versions=np.array([3, 3, 4], dtype=np.int32), reward=1.0, task={"answer": "12"})
    got = decode(encode(t), vocab_size=VOCAB, require_scored=True)
    for name in ("id", "run_id", "prompt_id", "policy_version", "reward", "task", "finish_reason"):
        assert getattr(got, name) == getattr(t, name)
    for name in (
        "prompt_token_ids",
        "response_token_ids",
        "behaviour_logprobs",
        "token_versions",
        "teacher_logprobs",
        "teacher_topk_ids",
        "teacher_topk_logprobs",
    ):
        np.testing.assert_array_equal(getattr(got, name), getattr(t, name))
        assert getattr(got, name).dtype == getattr(t, name).dtype


def test_arrays_travel_as_little_endian_bytes():
    msg = raw(make())
    assert msg["response_token_ids"]["dtype"] == "<i4" and isinstance(
        msg["response_token_ids"]["data"], bytes
    )
    assert msg["schema_version"] == SCHEMA_VERSION


def _mutate(fn):
    msg = raw(make())
    fn(msg)
    return msgpack.packb(msg, use_bin_type=True)


def _set_array(msg, name, arr, dtype=None):
    arr = np.asarray(arr, dtype=dtype or arr.dtype)
    msg[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}


BAD = {
    "schema": (lambda m: m.update(schema_version=99), "schema_version"),
    "kind": (lambda m: m.update(kind="weights"), "kind"),
    "missing field": (lambda m: m.pop("behaviour_logprobs"), "missing field"),
    "wrong scalar type": (lambda m: m.update(policy_version="3"), "policy_version"),
    "wrong dtype": (lambda m: _set_array(m, "behaviour_logprobs", np.zeros(3, dtype=np.float64)), "dtype"),
    "bytes vs shape": (lambda m: m["response_token_ids"].update(shape=[4]), "do not fit"),
    "nan": (
        lambda m: _set_array(m, "teacher_logprobs", np.array([-0.1, np.nan, -1], dtype=np.float32)),
        "NaN or inf",
    ),
    "inf": (
        lambda m: _set_array(m, "behaviour_logprobs", np.array([-np.inf, -1, -1], dtype=np.float32)),
        "NaN or inf",
    ),
    "positive logprob": (
        lambda m: _set_array(m, "teacher_logprobs", np.array([0.5, -1, -1], dtype=np.float32)),
        "positive",
    ),
    "vocab range": (
        lambda m: _set_array(m, "response_token_ids", np.array([7, 99, 2], dtype=np.int32)),
        "outside the vocabulary",
    ),
    "negative id": (
        lambda m: _set_array(m, "prompt_token_ids", np.array([-1, 2], dtype=np.int32)),
        "outside the vocabulary",
    ),
    "length mismatch": (
        lambda m: _set_array(m, "teacher_logprobs", np.zeros(2, dtype=np.float32)),
        "2 entries for 3",
    ),
    "topk shape": (
        lambda m: _set_array(m, "teacher_topk_ids", np.zeros((3, 3), dtype=np.int32)),
        "top-k shapes",
    ),
    "topk half": (lambda m: m.pop("teacher_topk_ids"), "must come together"),
    "empty response": (
        lambda m: (
            [
                _set_array(m, k, np.zeros(0, dtype=d))
                for k, d in (
                    ("response_token_ids", np.int32),
                    ("behaviour_logprobs", np.float32),
                    ("teacher_logprobs", np.float32),
                )
            ]
            and m.pop("teacher_topk_ids")
            and m.pop("teacher_topk_logprobs")
        ),
        "empty",
    ),
    "unknown field": (lambda m: m.update(pickle=b"x"), "unknown fields"),
    "more chunks than tokens": (lambda m: m.update(teacher_chunks=4), "teacher_chunks 4 for 3"),
    "no chunk": (lambda m: m.update(teacher_chunks=0), "teacher_chunks 0"),
    "matched share": (lambda m: m.update(teacher_topk_matched=1.5), "teacher_topk_matched"),
    # make() has policy_version 3: the sequence started under version 3, so its first token carries 3
    "token versions decrease": (
        lambda m: _set_array(m, "token_versions", np.array([3, 4, 3], dtype=np.int32)),
        r"token_versions decreases at token 2 \(4 -> 3\)",
    ),
    "first token is not policy_version": (
        lambda m: _set_array(m, "token_versions", np.array([2, 3, 3], dtype=np.int32)),
        r"token_versions\[0\] 2 != policy_version 3",
    ),
    "policy_version is not the first token": (
        lambda m: (
            m.update(policy_version=4),
            _set_array(m, "token_versions", np.array([3, 4, 4], np.int32)),
        ),
        r"token_versions\[0\] 3 != policy_version 4",
    ),
    "negative token version": (
        lambda m: (
            m.update(policy_version=0),
            _set_array(m, "token_versions", np.array([-1, 0, 0], np.int32)),
        ),
        r"token_versions has versions in \[-1, 0\]",
    ),
    "token versions length": (
        lambda m: _set_array(m, "token_versions", np.array([3, 3], dtype=np.int32)),
        "token_versions has 2 entries for 3",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_each_kind_of_bad_message_is_rejected_with_reason(case):
    fn, reason = BAD[case]
    with pytest.raises(ProtocolError, match=reason):
        decode(_mutate(fn), vocab_size=VOCAB)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1garbage", msgpack.packb([1, 2, 3]), msgpack.packb({1: 2}), b"\x91" * 100_000],
    ids=["empty", "garbage", "list", "int-keys", "deep-nesting"],
)
def test_garbage_is_a_protocol_error_not_a_crash(data):
    with pytest.raises(ProtocolError):
        decode(data, vocab_size=VOCAB)


def test_token_versions_that_grow_from_policy_version_are_accepted():
    """A sequence that crossed two weight updates (3 -> 5 -> 6), one that crossed none, and one without versions."""
    for versions in ([3, 5, 6], [3, 3, 3], None):
        tv = None if versions is None else np.array(versions, dtype=np.int32)
        got = decode(encode(make(token_versions=tv)), vocab_size=VOCAB)
        assert got.policy_version == 3 and (versions is None) == (got.token_versions is None)


def test_unscored_trajectory_refused_where_scores_are_required():
    t = make(teacher_logprobs=None, teacher_topk_ids=None, teacher_topk_logprobs=None)
    decode(encode(t), vocab_size=VOCAB)  # fine for a scorer
    with pytest.raises(ProtocolError, match="teacher scorer"):
        decode(encode(t), vocab_size=VOCAB, require_scored=True)


def test_no_pickle_on_the_wire():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    for folder in ("opd", "broker", "actors", "teacher_scorers", "learner", "weight_sync"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            assert "import pickle" not in text and "pickle.loads" not in text, path
