"""The wire format between actors, scorers and the learner: msgpack maps with arrays as raw little-endian bytes.

Nothing here unpickles: a message is data, checked field by field on receipt (schema version, types, dtype and
shape, lengths that must agree, finiteness, vocabulary range) so a bad producer costs one dead-lettered message,
never a crashed consumer or a poisoned gradient.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

SCHEMA_VERSION = 1
KIND = "trajectory"
_MAX_LOGPROB = 1e-3  # log-probabilities are <= 0; allow float rounding above zero
LOGPROB_FLOOR = -1e4  # a teacher's -inf (zero probability) is clamped here so messages stay finite
_UNPACK_LIMITS = {"max_str_len": 1 << 20, "max_array_len": 1 << 16, "max_map_len": 1 << 12, "max_ext_len": 0}


class ProtocolError(ValueError):
    """A message that must not reach a consumer; the text is the dead-letter reason."""


@dataclass
class Trajectory:
    """One sampled response with what each stage attached. Arrays are numpy; see DESIGN.md for meanings."""

    run_id: str
    prompt_id: str
    group_id: str
    sample_index: int
    prompt_token_ids: np.ndarray  # int32 (P,)
    response_token_ids: np.ndarray  # int32 (T,)
    behaviour_logprobs: np.ndarray  # float32 (T,) at behaviour_temperature, raw logits
    policy_version: int
    finish_reason: str = "length"
    behaviour_temperature: float = 1.0
    token_versions: np.ndarray | None = None  # int32 (T,) when weights changed mid-generation
    teacher_logprobs: np.ndarray | None = None  # float32 (T,)
    teacher_topk_ids: np.ndarray | None = None  # int32 (T, k)
    teacher_topk_logprobs: np.ndarray | None = None  # float32 (T, k)
    # float32 (T,): log of the teacher's mass outside its top-k, computed by the scorer from its full logits. A
    # confident teacher's tail (< 1e-7) cannot be recovered as 1 - sum(exp(top-k)) from float32 values.
    teacher_tail_logprobs: np.ndarray | None = None
    teacher_id: str | None = None
    teacher_temperature: float | None = None
    reward: float | None = None
    task: dict[str, str] = field(default_factory=dict)
    timestamps: dict[str, float] = field(default_factory=lambda: {"generated": time.time()})
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def is_scored(self) -> bool:
        return self.teacher_logprobs is not None


# (field, dtype, ndim, required)
_ARRAYS = (
    ("prompt_token_ids", np.int32, 1, True),
    ("response_token_ids", np.int32, 1, True),
    ("behaviour_logprobs", np.float32, 1, True),
    ("token_versions", np.int32, 1, False),
    ("teacher_logprobs", np.float32, 1, False),
    ("teacher_topk_ids", np.int32, 2, False),
    ("teacher_topk_logprobs", np.float32, 2, False),
    ("teacher_tail_logprobs", np.float32, 1, False),
)
_SCALARS: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "id": (str, True),
    "run_id": (str, True),
    "prompt_id": (str, True),
    "group_id": (str, True),
    "sample_index": (int, True),
    "policy_version": (int, True),
    "finish_reason": (str, True),
    "behaviour_temperature": ((int, float), True),
    "teacher_id": (str, False),
    "teacher_temperature": ((int, float), False),
    "reward": ((int, float), False),
}


def _pack_array(a: np.ndarray, dtype) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"dtype": np.dtype(dtype).str, "shape": list(a.shape), "data": a.tobytes()}


def encode(traj: Trajectory) -> bytes:
    msg: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "kind": KIND}
    for name in _SCALARS:
        value = getattr(traj, name)
        if value is not None:
            msg[name] = value
    msg["task"] = dict(traj.task)
    msg["timestamps"] = dict(traj.timestamps)
    for name, dtype, _, _ in _ARRAYS:
        value = getattr(traj, name)
        if value is not None:
            msg[name] = _pack_array(value, dtype)
    return msgpack.packb(msg, use_bin_type=True)


def _unpack_array(name: str, raw: Any, dtype, ndim: int) -> np.ndarray:
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data"}:
        raise ProtocolError(f"{name}: expected an array map {{dtype, shape, data}}")
    want = np.dtype(dtype).newbyteorder("<")
    if raw["dtype"] != want.str:
        raise ProtocolError(f"{name}: dtype {raw['dtype']!r}, expected {want.str!r}")
    shape = raw["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != ndim
        or not all(isinstance(d, int) and d >= 0 for d in shape)
    ):
        raise ProtocolError(f"{name}: shape {shape!r}, expected {ndim} non-negative dims")
    data = raw["data"]
    if not isinstance(data, bytes) or len(data) != int(np.prod(shape, dtype=np.int64)) * want.itemsize:
        raise ProtocolError(
            f"{name}: {len(data) if isinstance(data, bytes) else type(data).__name__} bytes do not fit shape {shape}"
        )
    return np.frombuffer(data, dtype=want).reshape(shape).astype(dtype, copy=False)


def _check_scalars(msg: dict[str, Any]) -> None:
    for name, (types, required) in _SCALARS.items():
        if name not in msg:
            if required:
                raise ProtocolError(f"missing field {name!r}")
            continue
        value = msg[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ProtocolError(f"{name}: {type(value).__name__} where {types} expected")
    for name in ("task", "timestamps"):
        value = msg.get(name, {})
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ProtocolError(f"{name}: expected a map with string keys")
    if msg["policy_version"] < 0:
        raise ProtocolError("policy_version is negative")


def _check_shapes(t: Trajectory) -> None:
    n = len(t.response_token_ids)
    if n == 0:
        raise ProtocolError("response_token_ids is empty")
    if len(t.prompt_token_ids) == 0:
        raise ProtocolError("prompt_token_ids is empty")
    for name in ("behaviour_logprobs", "token_versions", "teacher_logprobs", "teacher_tail_logprobs"):
        a = getattr(t, name)
        if a is not None and len(a) != n:
            raise ProtocolError(f"{name} has {len(a)} entries for {n} response tokens")
    if (t.teacher_topk_ids is None) != (t.teacher_topk_logprobs is None):
        raise ProtocolError("teacher_topk_ids and teacher_topk_logprobs must come together")
    if t.teacher_topk_ids is not None and (
        t.teacher_topk_ids.shape != t.teacher_topk_logprobs.shape or t.teacher_topk_ids.shape[0] != n
    ):
        raise ProtocolError(
            f"teacher top-k shapes {t.teacher_topk_ids.shape} and {t.teacher_topk_logprobs.shape} do not match ({n}, k)"
        )
    if t.teacher_tail_logprobs is not None and t.teacher_topk_ids is None:
        raise ProtocolError("teacher_tail_logprobs needs teacher_topk_ids and teacher_topk_logprobs")


def _check_values(t: Trajectory, vocab_size: int | None) -> None:
    for name in ("behaviour_logprobs", "teacher_logprobs", "teacher_topk_logprobs", "teacher_tail_logprobs"):
        a = getattr(t, name)
        if a is not None and a.size:
            if not np.isfinite(a).all():
                raise ProtocolError(f"{name} holds NaN or inf")
            if a.max() > _MAX_LOGPROB:
                raise ProtocolError(f"{name} holds a positive log-probability ({a.max():.4g})")
    for name in ("prompt_token_ids", "response_token_ids", "teacher_topk_ids"):
        a = getattr(t, name)
        if a is not None and a.size:
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or (vocab_size is not None and hi >= vocab_size):
                raise ProtocolError(
                    f"{name} has ids in [{lo}, {hi}] outside the vocabulary [0, {vocab_size})"
                )


def decode(
    data: bytes, *, vocab_size: int | None = None, require_scored: bool = False, max_bytes: int = 64 << 20
) -> Trajectory:
    """Parse and validate one message; raise ProtocolError with the reason for anything off."""
    if len(data) > max_bytes:  # checked before parsing: a huge message must not cost a huge decode
        raise ProtocolError(f"message of {len(data)} bytes exceeds broker.max_message_mb ({max_bytes} bytes)")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises several unrelated types for corrupt input
        raise ProtocolError(f"not a msgpack message ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"top level is {type(msg).__name__}, expected a map")
    if msg.get("schema_version") != SCHEMA_VERSION:
        raise ProtocolError(
            f"schema_version {msg.get('schema_version')!r}, this consumer reads {SCHEMA_VERSION}"
        )
    if msg.get("kind") != KIND:
        raise ProtocolError(f"kind {msg.get('kind')!r}, expected {KIND!r}")
    known = {"schema_version", "kind", "task", "timestamps", *_SCALARS, *(a[0] for a in _ARRAYS)}
    unknown = set(msg) - known
    if unknown:
        raise ProtocolError(f"unknown fields {sorted(unknown)[:5]}")
    _check_scalars(msg)
    arrays = {}
    for name, dtype, ndim, required in _ARRAYS:
        if name in msg:
            arrays[name] = _unpack_array(name, msg[name], dtype, ndim)
        elif required:
            raise ProtocolError(f"missing field {name!r}")
    scalars = {k: msg[k] for k in _SCALARS if k in msg}
    t = Trajectory(**scalars, **arrays, task=msg.get("task", {}), timestamps=msg.get("timestamps", {}))
    _check_shapes(t)
    _check_values(t, vocab_size)
    if require_scored and not t.is_scored:
        raise ProtocolError("trajectory has no teacher_logprobs; it must pass a teacher scorer first")
    return t


def trajectory_id(data: bytes) -> str | None:
    """The `id` of a trajectory message if it parses that far, else None: for the books of messages that failed
    validation (dead letters, ledgers). Bounded like every read of untrusted bytes."""
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except Exception:  # msgpack raises several unrelated types for corrupt input
        return None
    value = msg.get("id") if isinstance(msg, dict) else None
    return value if isinstance(value, str) else None


# ----------------------------------------------------------------------------- stream names
@dataclass(frozen=True)
class Streams:
    """The run's stream names, prefixed by the run id so several runs can share one broker.

    Consumer groups are named here too, so a reader and the writer that trims for it cannot drift apart."""

    run_id: str
    SCORERS_GROUP = "scorers"  # every scorer shares one group on `rollouts`: each rollout is scored once
    LEARNER_GROUP = "learner"
    LAUNCHER_GROUP = "launcher"

    def name(self, stream: str) -> str:
        return f"{self.run_id}:{stream}"

    @property
    def rollouts(self) -> str:
        return self.name("rollouts")

    @property
    def scored(self) -> str:
        return self.name("scored")

    @property
    def control(self) -> str:
        return self.name("control")

    @property
    def metrics(self) -> str:
        return self.name("metrics")

    @property
    def dead_letter(self) -> str:
        return self.name("dead_letter")


# ----------------------------------------------------------------------------- small control messages
def pack_control(kind: str, **fields: Any) -> bytes:
    """Control/metrics/dead-letter records: a typed msgpack map, also never pickled."""
    return msgpack.packb(
        {"schema_version": SCHEMA_VERSION, "kind": kind, "time": time.time(), **fields}, use_bin_type=True
    )


def unpack_control(data: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except Exception as exc:
        raise ProtocolError(f"not a msgpack message ({type(exc).__name__})") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("kind"), str):
        raise ProtocolError("control record needs a map with a string 'kind'")
    if msg.get("schema_version") != SCHEMA_VERSION:
        raise ProtocolError(f"schema_version {msg.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    return msg


# One constructor per control record kind, so a writer cannot misspell a field its readers look for.
def weights_record(version: int, epoch: int | None = None, members: list[str] | None = None) -> bytes:
    """On `control`: weight `version` is being broadcast to `members` in sync epoch `epoch`."""
    fields: dict[str, Any] = {"version": version}
    if epoch is not None:
        fields["epoch"] = epoch
    if members is not None:
        fields["members"] = members
    return pack_control("weights", **fields)


def stop_record(reason: str) -> bytes:
    """On `control`: the run is over (`max_steps`, `interrupted`, ...); every component exits."""
    return pack_control("stop", reason=reason)


def scale_record(role: str, target: int, source: str) -> bytes:
    """On `control`: the launcher should run `target` processes of `role` (`opd scale` or the autoscaler)."""
    return pack_control("scale", role=role, target=target, source=source)


def metrics_record(**fields: Any) -> bytes:
    """On `metrics`: one component's counters and rates (`component`, `role`, ...)."""
    return pack_control("metrics", **fields)


def dead_letter_record(source: str, reason: str, **fields: Any) -> bytes:
    """On `dead_letter`: a message refused by `source`, with the reason and (when it parses) its trajectory id."""
    return pack_control("dead_letter", source=source, reason=reason, **fields)
