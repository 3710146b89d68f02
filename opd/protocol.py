"""The wire format between actors, scorers and the learner: msgpack maps with arrays as raw little-endian bytes.

Nothing here unpickles: a message is data, checked field by field on receipt (schema version, types, dtype and
shape, lengths that must agree, finiteness, vocabulary range) so a bad producer costs one dead-lettered message,
never a crashed consumer or a poisoned gradient.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from opd.images import FORMATS as IMAGE_FORMATS
from opd.images import ImageBlob

SCHEMA_VERSION = 1
KIND = "trajectory"
_MAX_LOGPROB = 1e-3  # log-probabilities are <= 0; allow float rounding above zero
LOGPROB_FLOOR = -1e4  # a teacher's -inf (zero probability) is clamped here so messages stay finite
_UNPACK_LIMITS = {"max_str_len": 1 << 20, "max_array_len": 1 << 16, "max_map_len": 1 << 12, "max_ext_len": 0}
# Bounds on every scalar a consumer relies on. policy_version stays far below int64 so lag arithmetic and torch
# tensors of versions cannot overflow; a version of 2**63 would otherwise never count as stale.
MAX_POLICY_VERSION = 1 << 62
MAX_SAMPLE_INDEX = 1 << 31
MAX_ID_LEN = 256  # id, run_id: the trajectory and run names we mint
MAX_PROMPT_ID_LEN = 4096  # prompt_id, group_id: a JSONL prompt brings its own id (spaces allowed)
MAX_TEACHER_ID_LEN = 4096  # a model path or server description: spaces allowed, control characters not
MAX_FINISH_REASON_LEN = 64
# A teacher pool's name (opd.config.teachers.TEACHER_NAME: the core's two modules do not import each other).
TEACHER_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
# Trajectory.task key of the prompt's conversation (JSON list of {role, content}), stamped by actors of a run with a
# teacher of another tokenizer, which renders the same conversation with its own chat template
CONVERSATION_KEY = "_conversation"
DEFAULT_TEACHER = "default"  # the one teacher of a run without a teachers section
MAX_TEACHERS = 16
MAX_TEMPERATURE = 1e4
MAX_DIM = 1 << 31  # any one array dimension; the element count is bounded by the message size as well
MAX_MAP_ENTRIES = 64  # task and timestamps
MAX_MAP_STR_LEN = 1 << 16  # a task value (a reference answer) or key
MAX_IMAGES = 64  # images of one prompt
_IDS = ("id", "run_id")  # ours: no whitespace at all
_PROMPT_IDS = ("prompt_id", "group_id")  # may come from a user's JSONL: printable, spaces allowed


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
    # int32 (T,): the weight version that sampled each response token (a streaming actor takes new weights while
    # a sequence is in flight). Non-decreasing, and token_versions[0] == policy_version: the oldest token's version.
    token_versions: np.ndarray | None = None
    teacher_logprobs: np.ndarray | None = None  # float32 (T,)
    teacher_topk_ids: np.ndarray | None = None  # int32 (T, k)
    teacher_topk_logprobs: np.ndarray | None = None  # float32 (T, k)
    # float32 (T,): log of the teacher's mass outside its top-k, computed by the scorer from its full logits. A
    # confident teacher's tail (< 1e-7) cannot be recovered as 1 - sum(exp(top-k)) from float32 values.
    teacher_tail_logprobs: np.ndarray | None = None
    teacher_id: str | None = None  # what scored it: a model path or server description
    teacher_temperature: float | None = None
    # Set by the actor from `routing`: the teachers (pool names) that must score this trajectory, with weights
    # summing to 1. None = the run's one teacher. Several = a mixture, joined by id in the learner.
    teacher_weights: dict[str, float] | None = None
    teacher_name: str | None = None  # set by the scorer: the pool (teacher name) that scored this copy
    # A joined mixture (learner/join.py), one slab per teacher in sorted(teacher_weights) order: each teacher's own
    # top-k and tail, int32/float32 (M, T, k) and float32 (M, T). The teachers score in parallel without seeing
    # each other's top-k, so the mixture over the union of their ids is unknown and the learner keeps them apart.
    # Exclusive with teacher_topk_*; teacher_logprobs then holds the mixture log sum_i w_i exp(q_i).
    mixture_topk_ids: np.ndarray | None = None
    mixture_topk_logprobs: np.ndarray | None = None
    mixture_tail_logprobs: np.ndarray | None = None
    reward: float | None = None
    # Set by a teacher of another tokenizer (teacher_scorers/backends/cross_tokenizer.py): the response's aligned
    # chunks (1..T) and the share of the teacher's top-k mass matched to student ids, mean over the chunks' starts
    # (in [0, 1]; None without a top-k). The learner's step record averages them.
    teacher_chunks: int | None = None
    teacher_topk_matched: float | None = None
    # The prompt's images, in the order of their placeholders: encoded bytes with their sha256 (opd/images.py),
    # checked for structure and hash here; their pixels are checked by whoever decodes them (check_blob).
    images: list[ImageBlob] | None = None
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
    ("mixture_topk_ids", np.int32, 3, False),
    ("mixture_topk_logprobs", np.float32, 3, False),
    ("mixture_tail_logprobs", np.float32, 2, False),
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
    "teacher_name": (str, False),
    "teacher_temperature": ((int, float), False),
    "reward": ((int, float), False),
    "teacher_chunks": (int, False),
    "teacher_topk_matched": ((int, float), False),
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
    if traj.images is not None:
        msg["images"] = [{"format": i.format, "sha256": i.sha256, "data": i.data} for i in traj.images]
    if traj.teacher_weights is not None:
        msg["teacher_weights"] = dict(traj.teacher_weights)
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
    # Checked in Python integers before numpy sees the shape: numpy raises ValueError on a dimension of 2**63
    # and np.prod wraps around in int64, so a crafted shape could otherwise crash or fool the size check.
    if (
        not isinstance(shape, list)
        or len(shape) != ndim
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIM for d in shape)
    ):
        raise ProtocolError(f"{name}: shape {str(shape)[:80]}, expected {ndim} dims in [0, {MAX_DIM})")
    data = raw["data"]
    if not isinstance(data, bytes) or len(data) != math.prod(shape) * want.itemsize:
        raise ProtocolError(
            f"{name}: {len(data) if isinstance(data, bytes) else type(data).__name__} bytes do not fit shape {shape}"
        )
    return np.frombuffer(data, dtype=want).reshape(shape).astype(dtype, copy=False)


def _check_id(name: str, value: str, max_len: int) -> None:
    """Ids end up in line-based files (trained_ids.txt, ledgers) and log lines: non-empty, bounded, and nothing
    that could split or forge a line (whitespace, control characters)."""
    if not value or len(value) > max_len:
        raise ProtocolError(f"{name}: length {len(value)}, expected 1 to {max_len} characters")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise ProtocolError(f"{name}: {value[:40]!r} holds whitespace or control characters")


def _check_ranges(msg: dict[str, Any]) -> None:
    for name in _IDS:
        if name in msg:
            _check_id(name, msg[name], MAX_ID_LEN)
    for name in _PROMPT_IDS:  # printable excludes newline, tab and every other control character
        value = msg[name]
        if not value or len(value) > MAX_PROMPT_ID_LEN or not value.isprintable():
            raise ProtocolError(
                f"{name}: {value[:40]!r} must be 1 to {MAX_PROMPT_ID_LEN} printable characters"
            )
    teacher = msg.get("teacher_id")
    if teacher is not None and (len(teacher) > MAX_TEACHER_ID_LEN or not teacher.isprintable()):
        raise ProtocolError(f"teacher_id: at most {MAX_TEACHER_ID_LEN} printable characters")
    _check_teacher_name(msg.get("teacher_name"))
    reason = msg["finish_reason"]
    if len(reason) > MAX_FINISH_REASON_LEN or not reason.isprintable():
        raise ProtocolError(
            f"finish_reason {reason[:40]!r}: at most {MAX_FINISH_REASON_LEN} printable characters"
        )
    if not 0 <= msg["policy_version"] < MAX_POLICY_VERSION:
        raise ProtocolError(f"policy_version {msg['policy_version']} outside [0, 2**62)")
    if not 0 <= msg["sample_index"] < MAX_SAMPLE_INDEX:
        raise ProtocolError(f"sample_index {msg['sample_index']} outside [0, 2**31)")
    for name in ("behaviour_temperature", "teacher_temperature"):
        value = msg.get(name)
        if value is not None and not (math.isfinite(value) and 0 < value <= MAX_TEMPERATURE):
            raise ProtocolError(
                f"{name} {value!r}: expected a finite temperature in (0, {MAX_TEMPERATURE:g}]"
            )
    if "reward" in msg and not math.isfinite(msg["reward"]):
        raise ProtocolError(f"reward {msg['reward']!r} is not finite")
    _check_alignment(msg)


def _check_alignment(msg: dict[str, Any]) -> None:
    """A cross-tokenizer teacher's figures: a chunk count (bounded by the response's length in _check_shapes)
    and a share."""
    if "teacher_chunks" in msg and not 1 <= msg["teacher_chunks"] <= MAX_DIM:
        raise ProtocolError(f"teacher_chunks {msg['teacher_chunks']!r}: expected 1 to the response's length")
    matched = msg.get("teacher_topk_matched")
    if matched is not None and not (math.isfinite(matched) and 0.0 <= matched <= 1.0 + 1e-6):
        raise ProtocolError(f"teacher_topk_matched {matched!r}: expected a share in [0, 1]")


def _check_map(name: str, value: Any, kinds: tuple[type, ...]) -> None:
    if not isinstance(value, dict) or len(value) > MAX_MAP_ENTRIES:
        raise ProtocolError(f"{name}: expected a map of at most {MAX_MAP_ENTRIES} entries")
    for k, v in value.items():
        if not isinstance(k, str) or len(k) > MAX_MAP_STR_LEN:
            raise ProtocolError(f"{name}: keys must be strings of at most {MAX_MAP_STR_LEN} characters")
        if v is not None and not isinstance(v, kinds):
            raise ProtocolError(
                f"{name}[{k[:40]!r}]: {type(v).__name__}, expected {[t.__name__ for t in kinds]}"
            )
        if isinstance(v, str) and len(v) > MAX_MAP_STR_LEN:
            raise ProtocolError(f"{name}[{k[:40]!r}]: string longer than {MAX_MAP_STR_LEN}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ProtocolError(f"{name}[{k[:40]!r}]: {v!r} is not finite")


def _check_teacher_name(name: str | None) -> None:
    if name is not None and not TEACHER_NAME.fullmatch(name):
        raise ProtocolError(f"teacher_name {name[:40]!r}: expected a teacher name ([a-z][a-z0-9_]{{0,31}})")


def _check_teacher_weights(value: Any) -> None:
    """A route: 1 to MAX_TEACHERS teacher names, each with a weight in (0, 1], summing to 1."""
    if not isinstance(value, dict) or not 0 < len(value) <= MAX_TEACHERS:
        raise ProtocolError(f"teacher_weights: expected a map of 1 to {MAX_TEACHERS} teachers")
    for k, v in value.items():
        if not isinstance(k, str) or not TEACHER_NAME.fullmatch(k):
            raise ProtocolError(f"teacher_weights: {str(k)[:40]!r} is not a teacher name")
        if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and 0 < v <= 1):
            raise ProtocolError(f"teacher_weights[{k!r}]: {v!r}, expected a weight in (0, 1]")
    if abs(math.fsum(value.values()) - 1.0) > 1e-6:
        raise ProtocolError(f"teacher_weights sum to {math.fsum(value.values())!r}, expected 1")


def _check_scalars(msg: dict[str, Any]) -> None:
    for name, (types, required) in _SCALARS.items():
        if name not in msg:
            if required:
                raise ProtocolError(f"missing field {name!r}")
            continue
        value = msg[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ProtocolError(f"{name}: {type(value).__name__} where {types} expected")
    _check_ranges(msg)
    # task values are what a verifier reads (strings, numbers); timestamps are numbers (seconds since the epoch)
    _check_map("task", msg.get("task", {}), (str, int, float, bool))
    _check_map("timestamps", msg.get("timestamps", {}), (int, float))
    if "teacher_weights" in msg:
        _check_teacher_weights(msg["teacher_weights"])
    for k, v in msg.get("timestamps", {}).items():
        if isinstance(v, bool) or (isinstance(v, int) and abs(v) >= MAX_POLICY_VERSION):
            raise ProtocolError(f"timestamps[{k[:40]!r}]: {v!r} is not a time")


def _check_shapes(t: Trajectory) -> None:
    n = len(t.response_token_ids)
    if n == 0:
        raise ProtocolError("response_token_ids is empty")
    if len(t.prompt_token_ids) == 0:
        raise ProtocolError("prompt_token_ids is empty")
    if t.teacher_chunks is not None and t.teacher_chunks > n:
        raise ProtocolError(
            f"teacher_chunks {t.teacher_chunks} for {n} response tokens: a chunk holds at least one"
        )
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
    _check_mixture_shapes(t, n)


def _check_mixture_shapes(t: Trajectory, n: int) -> None:
    """A joined mixture's per-teacher top-k: one (T, k) slab per teacher of its route, nothing beside it."""
    ids, lps, tail = t.mixture_topk_ids, t.mixture_topk_logprobs, t.mixture_tail_logprobs
    if ids is None and lps is None and tail is None:
        return
    if ids is None or lps is None:
        raise ProtocolError("mixture_topk_ids and mixture_topk_logprobs must come together")
    if t.teacher_topk_ids is not None:
        raise ProtocolError("a mixture carries its top-k in mixture_topk_*, not teacher_topk_*")
    m = len(t.teacher_weights or {})
    if m < 2:
        raise ProtocolError("mixture_topk_* need teacher_weights naming the mixture's teachers (2 or more)")
    if ids.shape != lps.shape or ids.shape[:2] != (m, n):
        raise ProtocolError(
            f"mixture top-k shapes {ids.shape} and {lps.shape} do not match ({m} teachers, {n}, k)"
        )
    if tail is not None and tail.shape != (m, n):
        raise ProtocolError(f"mixture_tail_logprobs shape {tail.shape}, expected ({m}, {n})")


def _check_values(t: Trajectory, vocab_size: int | None) -> None:
    for name in (
        "behaviour_logprobs",
        "teacher_logprobs",
        "teacher_topk_logprobs",
        "teacher_tail_logprobs",
        "mixture_topk_logprobs",
        "mixture_tail_logprobs",
    ):
        a = getattr(t, name)
        if a is not None and a.size:
            if not np.isfinite(a).all():
                raise ProtocolError(f"{name} holds NaN or inf")
            if a.max() > _MAX_LOGPROB:
                raise ProtocolError(f"{name} holds a positive log-probability ({a.max():.4g})")
    for name in ("prompt_token_ids", "response_token_ids", "teacher_topk_ids", "mixture_topk_ids"):
        a = getattr(t, name)
        if a is not None and a.size:
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or (vocab_size is not None and hi >= vocab_size):
                raise ProtocolError(
                    f"{name} has ids in [{lo}, {hi}] outside the vocabulary [0, {vocab_size})"
                )


def _check_token_versions(t: Trajectory) -> None:
    """Versions only grow while a sequence is generated, and policy_version names the one it started under: the
    learner judges staleness by the oldest token (learner/intake.py `lag`), so a message whose first token is not
    the oldest, or whose policy_version disagrees with it, would be judged by a version that sampled none of it."""
    v = t.token_versions
    if v is None:
        return
    lo, hi = int(v.min()), int(v.max())
    if lo < 0 or hi >= MAX_POLICY_VERSION:
        raise ProtocolError(f"token_versions has versions in [{lo}, {hi}] outside [0, 2**62)")
    if len(v) > 1 and (np.diff(v.astype(np.int64)) < 0).any():
        at = int(np.argmax(np.diff(v.astype(np.int64)) < 0)) + 1
        raise ProtocolError(
            f"token_versions decreases at token {at} ({int(v[at - 1])} -> {int(v[at])}): versions only grow"
        )
    if int(v[0]) != t.policy_version:
        raise ProtocolError(
            f"token_versions[0] {int(v[0])} != policy_version {t.policy_version}: policy_version is the version "
            "of the oldest (first) token"
        )


def decode(
    data: bytes, *, vocab_size: int | None = None, require_scored: bool = False, max_bytes: int = 64 << 20
) -> Trajectory:
    """Parse and validate one message; raise ProtocolError with the reason for anything off, and nothing else.

    Consumers catch ProtocolError to dead-letter a message; any other exception would stop them. So whatever
    slips past the checks (a numpy or msgpack error on input nobody foresaw) is turned into a ProtocolError too."""
    try:
        return _decode(data, vocab_size, require_scored, max_bytes)
    except ProtocolError:
        raise
    except Exception as exc:  # a check we lack must cost one message, never the consumer
        raise ProtocolError(f"invalid message ({type(exc).__name__}: {str(exc)[:120]})") from None


def _decode(data: bytes, vocab_size: int | None, require_scored: bool, max_bytes: int) -> Trajectory:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"payload is {type(data).__name__}, expected bytes")
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
    known = {
        "schema_version",
        "kind",
        "task",
        "timestamps",
        "teacher_weights",
        "images",
        *_SCALARS,
        *(a[0] for a in _ARRAYS),
    }
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
    t = Trajectory(
        **scalars,
        **arrays,
        task=msg.get("task", {}),
        timestamps=msg.get("timestamps", {}),
        teacher_weights=msg.get("teacher_weights"),
        images=_unpack_images(msg["images"]) if "images" in msg else None,
    )
    _check_shapes(t)
    _check_values(t, vocab_size)
    _check_token_versions(t)
    if require_scored and not t.is_scored:
        raise ProtocolError("trajectory has no teacher_logprobs; it must pass a teacher scorer first")
    return t


def _unpack_images(raw: Any) -> list[ImageBlob]:
    """The images' structure and hashes (their pixels are the decoder's to check: opd.images.check_blob)."""
    if not isinstance(raw, list) or len(raw) > MAX_IMAGES:
        raise ProtocolError(f"images: expected a list of at most {MAX_IMAGES} image maps")
    out = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or set(entry) != {"format", "sha256", "data"}:
            raise ProtocolError(f"images[{i}]: expected a map {{format, sha256, data}}")
        fmt, digest, data = entry["format"], entry["sha256"], entry["data"]
        if fmt not in IMAGE_FORMATS or not isinstance(data, bytes) or not isinstance(digest, str):
            raise ProtocolError(f"images[{i}]: format must be one of {sorted(IMAGE_FORMATS)} with bytes data")
        if hashlib.sha256(data).hexdigest() != digest:
            raise ProtocolError(f"images[{i}]: sha256 does not match its bytes")
        out.append(ImageBlob(fmt, digest, data))
    return out


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

    def rollouts_for(self, teacher: str) -> str:
        """The rollouts stream a teacher's pool consumes: `rollouts` for the one teacher of a run without a
        teachers section (so such runs keep their stream names), `rollouts:<teacher>` for a named one."""
        return self.rollouts if teacher == DEFAULT_TEACHER else self.name(f"rollouts:{teacher}")

    @property
    def scored(self) -> str:
        return self.name("scored")

    def scored_for(self, teacher: str) -> str:
        """The stream a teacher's pool publishes its scored copies on: `scored` for the one teacher of a run
        without a teachers section, `scored:<teacher>` for a named one. One per teacher, each bounded on its own,
        so one pool's backlog never waits behind another's and each pool's depth is its own to watch."""
        return self.scored if teacher == DEFAULT_TEACHER else self.name(f"scored:{teacher}")

    def for_teachers(self, kind: str, teachers: Iterable[str]) -> list[str]:
        """Each teacher's stream of work `kind` ("rollouts" or "scored"): what a queue's depth sums over."""
        per_teacher = {"rollouts": self.rollouts_for, "scored": self.scored_for}[kind]
        return [per_teacher(t) for t in teachers]

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
    """The record in `data`, or ProtocolError (never another exception) for anything but a typed map."""
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
def weights_record(
    version: int, epoch: int | None = None, members: list[str] | None = None, auth: str | None = None
) -> bytes:
    """On `control`: weight `version` is being broadcast to `members` in sync epoch `epoch`; `auth` is the
    learner's signature of it with the run's weight-sync secret (actors ignore an announcement without one)."""
    fields: dict[str, Any] = {"version": version}
    if epoch is not None:
        fields["epoch"] = epoch
    if members is not None:
        fields["members"] = members
    if auth is not None:
        fields["auth"] = auth
    return pack_control("weights", **fields)


def stop_record(reason: str) -> bytes:
    """On `control`: the run is over (`max_steps`, `interrupted`, ...); every component exits."""
    return pack_control("stop", reason=reason)


def scale_record(role: str, target: int, source: str, teacher: str | None = None) -> bytes:
    """On `control`: the launcher should run `target` processes of `role` (`opd scale` or the autoscaler); for
    scorers, of `teacher`'s pool (None: the run's one teacher)."""
    fields = {} if teacher is None else {"teacher": teacher}
    return pack_control("scale", role=role, target=target, source=source, **fields)


def metrics_record(**fields: Any) -> bytes:
    """On `metrics`: one component's counters and rates (`component`, `role`, ...)."""
    return pack_control("metrics", **fields)


def dead_letter_record(source: str, reason: str, **fields: Any) -> bytes:
    """On `dead_letter`: a message refused by `source`, with the reason and (when it parses) its trajectory id."""
    return pack_control("dead_letter", source=source, reason=reason, **fields)
