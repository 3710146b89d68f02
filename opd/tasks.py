"""Prompt sources and verifiers.

Actors draw training prompts from here, and the learner and launcher draw the held-out set and the verifier, so
every process agrees on what a problem is and what counts as correct.

Task kinds: `addition` (the tiny demo's `a+b=`) and `reversal` (`1234=` -> `4321`, in the same characters, so the
tiny models can learn both), `jsonl` (your files), two generated for real instruct models with no download:
`capitals` and `word_problems`, each with a seeded held-out split that training never draws from, `visual_digits`
(a PNG of a number, `<image>What number?`, for the tiny vision-language models), and `mixture`: prompts drawn from
several of those by weight, each tagged with its task's name (`Problem.metadata["task"]`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from opd import verifiers
from opd.config.images import ImagesConfig
from opd.config.task import (
    AdditionTask,
    AnyTask,
    CapitalsTask,
    JsonlTask,
    MixtureTask,
    ReversalTask,
    VisualDigitsTask,
    WordProblemsTask,
    verifier_of,
)
from opd.images import ImageBlob, ImageError, check_blob, sniff

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Problem:
    """One prompt and its reference answer. `messages` is the conversation when the prompt came as one (roles
    system/user/assistant, ending with a user turn); empty means the single user turn `prompt`. How it becomes
    token ids is opd.models.prompts' business: `system_prompt` (the task's, for a conversation without its own
    system turn) and `chat_template` (task.chat_template is auto) come from the task."""

    prompt_id: str
    prompt: str
    answer: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    messages: tuple[tuple[str, str], ...] = ()
    system_prompt: str | None = None
    chat_template: bool = True
    # Encoded images (PNG or JPEG bytes, never decoded arrays), one per IMAGE_TOKEN of the prompt, in order.
    images: tuple[bytes, ...] = ()


def verify(answer: str | None, completion: str, mode: str = "exact") -> bool:
    """True when `completion` solves the problem under verifier `mode` (a name of opd.verifiers, or
    `module:function`); kept here so callers need only `opd.tasks`."""
    return verifiers.verify(answer, completion, mode)


# ----------------------------------------------------------------------------------------- addition
ADDITION_ALPHABET = "0123456789+="


def _addition_problem(rng: random.Random, max_digits: int) -> tuple[int, int]:
    da, db = rng.randint(1, max_digits), rng.randint(1, max_digits)
    return rng.randint(10 ** (da - 1) if da > 1 else 0, 10**da - 1), rng.randint(
        10 ** (db - 1) if db > 1 else 0, 10**db - 1
    )


def _as_problem(a: int, b: int) -> Problem:
    return Problem(prompt_id=f"{a}+{b}", prompt=f"{a}+{b}=", answer=str(a + b))


def addition_eval_set(task: AdditionTask) -> list[Problem]:
    rng = random.Random(task.eval_seed)
    seen: dict[str, Problem] = {}
    while len(seen) < task.eval_size:
        p = _as_problem(*_addition_problem(rng, task.max_digits))
        seen.setdefault(p.prompt_id, p)
        if len(seen) >= 10 ** (2 * task.max_digits):
            break
    return list(seen.values())


def addition_stream(task: AdditionTask, seed: int) -> Iterator[Problem]:
    """Endless training problems; held-out problems are skipped so accuracy measures generalisation."""
    held_out = {p.prompt_id for p in addition_eval_set(task)}
    rng = random.Random(seed)
    while True:
        p = _as_problem(*_addition_problem(rng, task.max_digits))
        if p.prompt_id not in held_out:
            yield p


# ----------------------------------------------------------------------------------------- reversal
def _reversal_problem(rng: random.Random, task: ReversalTask) -> Problem:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(task.min_digits, task.max_digits)))
    return Problem(prompt_id=f"rev:{digits}", prompt=f"{digits}=", answer=digits[::-1])


def reversal_eval_set(task: ReversalTask) -> list[Problem]:
    rng = random.Random(task.eval_seed)
    distinct = sum(10**n for n in range(task.min_digits, task.max_digits + 1))
    # at most half of all strings: training keeps the other half (short strings alone would all be held out)
    want = min(task.eval_size, distinct // 2)
    seen: dict[str, Problem] = {}
    while len(seen) < want:
        p = _reversal_problem(rng, task)
        seen.setdefault(p.prompt_id, p)
    return list(seen.values())


def reversal_stream(task: ReversalTask, seed: int) -> Iterator[Problem]:
    """Endless training strings; held-out ones are skipped so accuracy measures generalisation."""
    held_out = {p.prompt_id for p in reversal_eval_set(task)}
    rng = random.Random(seed)
    while True:
        p = _reversal_problem(rng, task)
        if p.prompt_id not in held_out:
            yield p


# -------------------------------------------------------------------------------------------- jsonl
# A JSONL row's images: each a path (relative to the JSONL file's directory, or absolute), a data URI
# (`data:image/png;base64,...`) or bare base64 of PNG or JPEG bytes. They are read and checked when the file is
# loaded (opd.images.check_blob, the images section's limits), so a bad one stops `opd run` before any process
# starts, and are kept as given: never decoded into the problem, never re-encoded.
IMAGE_FIELD_SHAPE = '{"prompt": "<image>What number?", "images": ["digits/7.png"]}'
IMAGE_SOURCES = (
    "a path relative to the JSONL file, a data:image/png;base64,... (or image/jpeg) URI, "
    "or base64 of the bytes"
)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DATA_URI = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),", re.DOTALL)
_DATA_TYPES = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg"}
_B64_MAGIC = ("iVBORw0KGgo", "/9j/")  # the PNG and JPEG magic bytes in base64: bare base64, not a path
_IMAGE_KEYS = ("image", "url", "path")  # where an {"type": "image"} part may hold its image (HF's styles)
MAX_PROMPT_ID = 4096  # the wire's limit on a prompt id (opd.protocol.MAX_PROMPT_ID_LEN)


@dataclass(frozen=True)
class ImageRef:
    """One image a row names, not yet read: its source as written and where in the row it was (for errors)."""

    source: object
    what: str  # e.g. "images[0]" or "messages[1].content[0].image"


class JsonlImages:
    """Reads and checks the images of one JSONL file: paths resolve against the file's directory, each file and
    each distinct image is read and checked once (a path named by many rows is one bytes object in memory)."""

    def __init__(self, jsonl: Path, limits: ImagesConfig | None = None):
        self.base = jsonl.parent
        self.limits = limits or ImagesConfig()
        self._by_path: dict[Path, ImageBlob] = {}
        self._by_sha: dict[str, ImageBlob] = {}

    def read_all(self, refs: list[ImageRef], where: str) -> list[ImageBlob]:
        """The row's images, in order; ValueError naming the row, the image and why when one cannot be used."""
        if len(refs) > self.limits.max_per_prompt:
            raise ValueError(
                f"{where}: the row has {len(refs)} images, more than images.max_per_prompt "
                f"({self.limits.max_per_prompt}); split the row or raise images.max_per_prompt (at most 64)"
            )
        return [self.read(ref, where) for ref in refs]

    def read(self, ref: ImageRef, where: str) -> ImageBlob:
        src = ref.source
        if not isinstance(src, str) or not src:
            raise ValueError(
                f"{where}: {ref.what} must be a non-empty string (got {type(src).__name__}): {IMAGE_SOURCES}"
            )
        label = _source_label(src)
        try:
            if src.startswith("data:"):
                blob = self._checked(_data_uri_bytes(src))
            elif _URL.match(src):
                raise ImageError(
                    "is a URL; nothing is downloaded at run time: download the image once and give its path "
                    "(relative to the JSONL file) or inline it as a data:image/png;base64,... URI"
                )
            elif src.startswith(_B64_MAGIC) and (data := _b64(src)) is not None:
                blob = self._checked(data)
            else:
                blob = self._file(src)
        except ImageError as exc:
            raise ValueError(f"{where}: {ref.what} ({label}) {_with_fix(str(exc))}") from None
        return blob

    def _file(self, src: str) -> ImageBlob:
        path = Path(src) if Path(src).is_absolute() else self.base / src
        if path in self._by_path:
            return self._by_path[path]
        if not _is_file(path):
            what = "is a directory" if _is_file(path, dirs=True) else "does not exist"
            hint = " (nor is it base64 of a PNG or JPEG)" if len(src) > 256 else ""
            raise ImageError(
                f"{what}: looked for {path.resolve()}{hint}; paths are relative to the JSONL file's directory "
                f"({self.base.resolve()}): fix the path or put the image there"
            )
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot be read ({exc.strerror}); check its permissions") from None
        self._by_path[path] = blob = self._checked(data)
        return blob

    def _checked(self, data: bytes) -> ImageBlob:
        blob = ImageBlob.of(data)  # ImageError when the bytes are neither PNG nor JPEG
        if blob.sha256 not in self._by_sha:
            check_blob(blob, self.limits.max_pixels)
            self._by_sha[blob.sha256] = blob
        return self._by_sha[blob.sha256]


def _is_file(path: Path, dirs: bool = False) -> bool:
    """path.is_file() (or is_dir()), False for a name no file can have (too long, a NUL byte) rather than raising:
    base64 of another format is taken for a path, and should be refused as a missing file."""
    try:
        return path.is_dir() if dirs else path.is_file()
    except (OSError, ValueError):
        return False


def _source_label(src: str) -> str:
    """How an error names an image source: a path as written, inline data by its kind and size."""
    if src.startswith("data:"):
        return f"a data URI of {len(src)} characters"
    if src.startswith(_B64_MAGIC) and len(src) > 64:
        return f"base64 of {len(src)} characters"
    return repr(src if len(src) <= 200 else src[:200] + "...")


def _b64(text: str) -> bytes | None:
    """The bytes of base64 text (line breaks and spaces allowed: some writers wrap at 76), or None."""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


def _data_uri_bytes(uri: str) -> bytes:
    """The bytes of a `data:image/png;base64,...` (or image/jpeg) URI; ImageError saying what is wrong."""
    m = _DATA_URI.match(uri)
    if m is None:
        raise ImageError("is not a data URI of the form data:image/png;base64,<base64 of the bytes>")
    mime, params = m.group(1).strip().lower(), m.group(2).lower().split(";")
    if mime not in _DATA_TYPES:
        raise ImageError(
            f"declares {mime or 'no media type'}; only PNG and JPEG images are taken (data:image/png;base64,... "
            "or data:image/jpeg;base64,...): convert it to one of them"
        )
    if "base64" not in params:
        raise ImageError("is not base64-encoded; write it as data:image/png;base64,<base64 of the bytes>")
    data = _b64(uri[m.end() :])
    if data is None:
        raise ImageError("holds text that is not valid base64 after 'base64,'; re-encode the image")
    declared, found = _DATA_TYPES[mime], _sniffed(data)
    if found is not None and found != declared:
        raise ImageError(f"declares {mime} but its bytes are {found}; fix the media type")
    return data


def _sniffed(data: bytes) -> str | None:
    try:
        return sniff(data)
    except ImageError:
        return None


def _with_fix(reason: str) -> str:
    """An image's ImageError reason with what the user can do about it."""
    if "images.max_pixels" in reason:
        return f"{reason}; shrink the image or raise images.max_pixels"
    if reason.startswith("not a PNG or JPEG"):
        return f"is {reason}; convert it to PNG or JPEG (images are passed on as given, never re-encoded)"
    if reason.startswith("image does not decode"):
        return f"{reason}; the file is truncated or corrupt: save it again as PNG or JPEG"
    return reason


def _image_url_ref(value: object, where: str, at: str) -> ImageRef:
    """The image of an OpenAI-style `image_url` part: {"url": <image>} (an optional "detail" is the API's hint
    for its own resizing; ignored: the image goes on as given), or the bare string."""
    if isinstance(value, str):
        return ImageRef(value, f"{at}.image_url")
    if isinstance(value, dict) and "url" in value and set(value) <= {"url", "detail"}:
        return ImageRef(value["url"], f"{at}.image_url.url")
    raise ValueError(
        f'{where}: {at}.image_url must be {{"url": <image>}} (an optional "detail" aside), where <image> is '
        + IMAGE_SOURCES
    )


def _content_parts(value: list, where: str, field: str) -> tuple[str, list[ImageRef]]:
    """A turn's content given as parts (OpenAI/HF style): the text with IMAGE_TOKEN where each image was, and the
    images in order. Parts are joined as written, with no separator added."""
    text, refs = [], []
    for j, part in enumerate(value):
        at = f"{field}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and set(part) == {"type", "text"} and isinstance(part["text"], str):
            if IMAGE_TOKEN in part["text"]:
                raise ValueError(
                    f"{where}: {at}.text holds {IMAGE_TOKEN!r}, which marks an image's place; give the image as "
                    'its own {"type": "image", "image": ...} part, or drop the placeholder from the text'
                )
            text.append(part["text"])
        elif kind == "image" and len(keys := [k for k in _IMAGE_KEYS if k in part]) == 1 and len(part) == 2:
            refs.append(ImageRef(part[keys[0]], f"{at}.{keys[0]}"))
            text.append(IMAGE_TOKEN)
        elif kind == "image_url" and set(part) == {"type", "image_url"}:
            refs.append(_image_url_ref(part["image_url"], where, at))
            text.append(IMAGE_TOKEN)
        else:
            raise ValueError(
                f"{where}: {at} must be one of "
                '{"type": "text", "text": "..."}, {"type": "image", "image": <image>} or '
                '{"type": "image_url", "image_url": {"url": <image>}}, where <image> is ' + IMAGE_SOURCES
            )
    return "".join(text), refs


def _messages(value: object, where: str) -> tuple[tuple[tuple[str, str], ...], list[ImageRef]]:
    """A JSONL row's `messages` as (role, content) pairs, and the images its content parts name (in order), or
    ValueError saying what is wrong and how to fix it. A content given as parts becomes its text with IMAGE_TOKEN
    at each image's place."""
    shape = '[{"role": "user", "content": "..."}]'
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: 'messages' must be a non-empty list like {shape}")
    turns, refs = [], []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ValueError(f"{where}: messages[{i}] must be an object with exactly 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in CHAT_ROLES:
            raise ValueError(f"{where}: messages[{i}].role is {role!r}; use one of {', '.join(CHAT_ROLES)}")
        if isinstance(content, list) and content:
            content, found = _content_parts(content, where, f"messages[{i}].content")
            refs += found
        elif not isinstance(content, str):
            raise ValueError(
                f"{where}: messages[{i}].content must be a string or a non-empty list of content parts "
                '({"type": "text", ...}, {"type": "image", ...}, {"type": "image_url", ...})'
            )
        if role == "system" and i > 0:
            raise ValueError(f"{where}: messages[{i}] is a system turn; only the first turn may be one")
        turns.append((role, content))
    chat = [r for r, _ in turns if r != "system"]
    if not chat or chat[0] != "user" or chat[-1] != "user":
        raise ValueError(
            f"{where}: after an optional system turn the messages must start with a user turn and end with one "
            "(the student answers the last user turn)"
        )
    return tuple(turns), refs


def _listed_images(row: dict, where: str) -> list[ImageRef]:
    """The row's `images` list (beside `prompt`, or `messages` whose contents are strings)."""
    if "images" not in row:
        return []
    value = row["images"]
    if not isinstance(value, list):
        raise ValueError(
            f"{where}: 'images' must be a list of images, each {IMAGE_SOURCES}; e.g. {IMAGE_FIELD_SHAPE}"
        )
    return [ImageRef(src, f"images[{k}]") for k, src in enumerate(value)]


def _placeholders_fit(field: str, held: int, images: int, where: str) -> None:
    """One IMAGE_TOKEN per image, in order: a processor puts each image where its placeholder is, so a missing
    or extra one would shift every image after it (or leave a placeholder with no pixels)."""
    if held == images:
        return
    if images == 0:
        raise ValueError(
            f"{where}: '{field}' holds {IMAGE_TOKEN!r} {held} time(s) but the row has no images; it marks an "
            f"image's place: add the images (e.g. {IMAGE_FIELD_SHAPE}) or remove it from the text"
        )
    raise ValueError(
        f"{where}: '{field}' holds {IMAGE_TOKEN!r} {held} time(s) but the row has {images} image(s); put one "
        f"{IMAGE_TOKEN!r} in the text where each image goes, in the order of 'images' (e.g. {IMAGE_FIELD_SHAPE}), "
        'or give them as {"type": "image", ...} parts of a message\'s content'
    )


def _row_prompt(
    row: object, where: str, reader: JsonlImages
) -> tuple[str, tuple[tuple[str, str], ...], list[ImageBlob]]:
    """(prompt text, conversation, images) of one JSONL row: `prompt` is the raw text, `messages` a chat whose last
    user turn is also the prompt text (what reports and logs show); images from `images` or content parts, in
    the order of their IMAGE_TOKENs over the whole conversation."""
    if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
        raise ValueError(
            f"{where}: each line needs a string field 'prompt' or a list 'messages' of "
            '{"role": ..., "content": ...} turns (not both)'
        )
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise ValueError(f"{where}: each line needs a string field 'prompt'")
        turns, in_parts, held = (), [], row["prompt"].count(IMAGE_TOKEN)
    else:
        turns, in_parts = _messages(row["messages"], where)
        held = sum(content.count(IMAGE_TOKEN) for _, content in turns)
    listed = _listed_images(row, where)
    if listed and in_parts:
        raise ValueError(
            f"{where}: images given both in 'images' and as content parts of 'messages'; give each image once: "
            f"as a content part, or as {IMAGE_TOKEN!r} in a string content with the image in 'images'"
        )
    field = "prompt" if "prompt" in row else "messages"
    _placeholders_fit(field, held, len(listed) + len(in_parts), where)
    images = reader.read_all(listed or in_parts, where)
    return (row["prompt"] if "prompt" in row else turns[-1][1]), turns, images


ROW_FIELDS = ("prompt", "messages", "images", "answer", "id")
MAX_ROW_METADATA = 32  # extra fields kept per row: they travel in every trajectory (Trajectory.task)
MAX_METADATA_CHARS = 1024


def _row_metadata(row: dict) -> dict[str, str]:
    """A JSONL row's other scalar fields as strings (a `topic` column, say: what `routing.field` can route by);
    the first MAX_ROW_METADATA of them no longer than MAX_METADATA_CHARS, since each one travels with every
    trajectory of the prompt."""
    found = {
        k: json.dumps(v) if isinstance(v, bool) else str(v)
        for k, v in row.items()
        if k not in ROW_FIELDS and isinstance(v, str | int | float | bool)
    }
    kept = {k: v for k, v in found.items() if len(k) <= 64 and len(v) <= MAX_METADATA_CHARS}
    return dict(list(kept.items())[:MAX_ROW_METADATA])


def images_key(images: list[ImageBlob]) -> str:
    """What a JSONL prompt id carries of its images: 16 hex digits of the sha256 over their sha256s in order, so
    two rows of the same text (or the same `id`) with different images are different prompts."""
    h = hashlib.sha256()
    for blob in images:
        h.update(bytes.fromhex(blob.sha256))
    return h.hexdigest()[:16]


def _prompt_id(row: dict, name: str, where: str, images: list[ImageBlob]) -> str:
    """The row's `id` (else file:line), with `#img:<images_key>` appended when it has images."""
    suffix = f"#img:{images_key(images)}" if images else ""
    prompt_id = str(row.get("id", name))
    if not prompt_id or len(prompt_id) > MAX_PROMPT_ID - len(suffix) or not prompt_id.isprintable():
        raise ValueError(
            f"{where}: 'id' must be 1 to {MAX_PROMPT_ID - len(suffix)} printable characters (no newline or tab)"
            f"{' (a row with images gets ' + repr(suffix[:5]) + ' and 16 hex digits appended)' if suffix else ''}"
            "; fix it or drop the field to use file:line"
        )
    return prompt_id + suffix


def read_jsonl_problems(path: Path, images: ImagesConfig | None = None) -> list[Problem]:
    """Every row of a JSONL file as a Problem (ValueError naming file:line, the field and the fix otherwise),
    images read and checked against `images` (the config's images section; its defaults when None)."""
    reader = JsonlImages(path, images)
    problems: list[Problem] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            where = f"{path}:{lineno}"
            prompt, messages, blobs = _row_prompt(row, where, reader)
            answer = row.get("answer")
            problems.append(
                Problem(
                    prompt_id=_prompt_id(row, f"{path.name}:{lineno}", where, blobs),
                    prompt=prompt,
                    answer=None if answer is None else str(answer),
                    metadata=_row_metadata(row),
                    messages=messages,
                    images=tuple(b.data for b in blobs),
                )
            )
    if not problems:
        raise ValueError(f"{path}: no prompts found")
    return problems


def jsonl_stream(task: JsonlTask, seed: int, images: ImagesConfig | None = None) -> Iterator[Problem]:
    problems = read_jsonl_problems(task.train_path, images)
    rng = random.Random(seed)
    while True:
        order = list(problems)
        rng.shuffle(order)
        yield from order


def _turns(p: Problem) -> int:
    return sum(role != "system" for role, _ in p.messages)


def _unwritable(problems: list[Problem], alphabet: str) -> str | None:
    """Why a tiny model cannot take one of `problems`: a character its tokenizer lacks (it would read an unknown
    token, silently), or a conversation (it has no chat template: only one user turn renders); None when it can."""
    for p in problems:
        if p.messages and len(p.messages) > 1:
            return (
                f"prompt {p.prompt_id} is a conversation of {len(p.messages)} turns, and the tiny models have no "
                "chat template to render one; give one user turn (or a plain 'prompt')"
            )
        bad = set(p.prompt.replace(IMAGE_TOKEN, "") + (p.answer or "")) - set(alphabet)
        if bad:
            return (
                f"prompt {p.prompt_id} has characters {''.join(sorted(bad))!r} the tiny models' tokenizer cannot "
                f"write (it writes {alphabet!r}); use those characters only, or pretrained models"
            )
    return None


def _jsonl_file_problems(
    field: str,
    path: Path,
    task: JsonlTask,
    needs_answer: bool,
    images: ImagesConfig | None,
    alphabet: str | None = None,
) -> list[tuple[str, str]]:
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        return [
            (
                field,
                f"{path} {what} (resolved from {Path.cwd()} to {path.resolve()}); point {field} at a JSONL file "
                'with one {"prompt": "...", "answer": "..."} (or {"messages": [...], "answer": "..."}) object '
                "per line",
            )
        ]
    try:
        problems = read_jsonl_problems(path, images)
    except ValueError as exc:
        return [(field, f"{exc}; fix that line of the file")]
    except UnicodeDecodeError as exc:
        return [(field, f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8")]
    except OSError as exc:
        return [(field, f"{path} cannot be read ({exc.strerror}); check its permissions")]
    if task.chat_template == "none" and (many := next((p for p in problems if _turns(p) > 1), None)):
        return [
            (
                field,
                f"{path}: prompt {many.prompt_id} is a conversation of several turns, which only a chat template "
                "can render; set task.chat_template: auto (with a model that has a template) or give single turns",
            )
        ]
    if alphabet is not None and (why := _unwritable(problems, alphabet)):
        return [(field, f"{path}: {why}")]
    missing = [p.prompt_id for p in problems if p.answer is None]
    if needs_answer and missing:
        return [
            (
                field,
                f"{path}: {len(missing)} of {len(problems)} held-out prompts have no 'answer' (first: {missing[0]}), "
                "so they could never be scored correct; add an answer to each line",
            )
        ]
    return []


def task_problems(
    task: AnyTask, images: ImagesConfig | None = None, alphabet: str | None = None
) -> list[tuple[str, str]]:
    """Every problem of the task's files, as (config field, message) pairs, read now rather than by a component
    minutes later: a missing file, a line that is not JSON or has no prompt (named by file and line), an image
    that is missing, not PNG/JPEG, corrupt or over the `images` limits (the config's images section), held-out
    prompts without an answer, and with `alphabet` (a tiny model's characters: VISUAL_ALPHABET for the tiny VLMs)
    a prompt or answer it cannot write or a conversation it cannot render. `opd run` and `opd prepare` refuse the
    config with them before starting anything."""
    if task.kind == "mixture":
        return [
            (f"task.tasks.{name}.{key.removeprefix('task.')}", msg)
            for name, sub in task.tasks.items()
            for key, msg in task_problems(sub, images, alphabet)
        ]
    if task.kind != "jsonl":
        return []
    found = _jsonl_file_problems("task.train_path", task.train_path, task, False, images, alphabet)
    if task.eval_path is not None:
        found += _jsonl_file_problems("task.eval_path", task.eval_path, task, True, images, alphabet)
    return found


# ----------------------------------------------------------------------------------------- capitals
# (country as asked, capital). Kept: capitals with one accepted English name in plain ASCII (so `contains` needs no
# accent or spelling rules), not contained in their country's name ("Tunis"/"Tunisia" would verify a wrong answer)
# and not in one another ("Kingston"/"Kingstown"). Left out: disputed or split capitals (Bolivia, South Africa,
# the Netherlands, Israel, Sri Lanka, Benin, Tanzania, Ivory Coast), renamed or variously spelled ones (Kazakhstan,
# Ukraine, Myanmar, Mongolia, Yemen, Chad), city-states, and names that are also other places (Georgia).
CAPITALS: tuple[tuple[str, str], ...] = (
    # Europe
    ("Albania", "Tirana"), ("Andorra", "Andorra la Vella"), ("Armenia", "Yerevan"), ("Austria", "Vienna"),
    ("Azerbaijan", "Baku"), ("Belarus", "Minsk"), ("Belgium", "Brussels"), ("Bosnia and Herzegovina", "Sarajevo"),
    ("Bulgaria", "Sofia"), ("Croatia", "Zagreb"), ("Cyprus", "Nicosia"), ("the Czech Republic", "Prague"),
    ("Denmark", "Copenhagen"), ("Estonia", "Tallinn"), ("Finland", "Helsinki"), ("France", "Paris"),
    ("Germany", "Berlin"), ("Greece", "Athens"), ("Hungary", "Budapest"), ("Ireland", "Dublin"), ("Italy", "Rome"),
    ("Latvia", "Riga"), ("Liechtenstein", "Vaduz"), ("Lithuania", "Vilnius"), ("Malta", "Valletta"),
    ("Montenegro", "Podgorica"), ("North Macedonia", "Skopje"), ("Norway", "Oslo"), ("Poland", "Warsaw"),
    ("Portugal", "Lisbon"), ("Romania", "Bucharest"), ("Russia", "Moscow"), ("Serbia", "Belgrade"),
    ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"), ("Spain", "Madrid"), ("Sweden", "Stockholm"),
    ("Switzerland", "Bern"), ("the United Kingdom", "London"),
    # Asia
    ("Afghanistan", "Kabul"), ("Bahrain", "Manama"), ("Bangladesh", "Dhaka"), ("Bhutan", "Thimphu"),
    ("Brunei", "Bandar Seri Begawan"), ("Cambodia", "Phnom Penh"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Indonesia", "Jakarta"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Japan", "Tokyo"), ("Jordan", "Amman"),
    ("Kuwait", "Kuwait City"), ("Kyrgyzstan", "Bishkek"), ("Laos", "Vientiane"), ("Lebanon", "Beirut"),
    ("Malaysia", "Kuala Lumpur"), ("Nepal", "Kathmandu"), ("North Korea", "Pyongyang"), ("Oman", "Muscat"),
    ("Pakistan", "Islamabad"), ("the Philippines", "Manila"), ("Qatar", "Doha"), ("Saudi Arabia", "Riyadh"),
    ("South Korea", "Seoul"), ("Syria", "Damascus"), ("Tajikistan", "Dushanbe"), ("Thailand", "Bangkok"),
    ("East Timor", "Dili"), ("Turkey", "Ankara"), ("Turkmenistan", "Ashgabat"),
    ("the United Arab Emirates", "Abu Dhabi"), ("Uzbekistan", "Tashkent"), ("Vietnam", "Hanoi"),
    # Africa
    ("Algeria", "Algiers"), ("Angola", "Luanda"), ("Botswana", "Gaborone"), ("Burkina Faso", "Ouagadougou"),
    ("Cape Verde", "Praia"), ("the Central African Republic", "Bangui"), ("Comoros", "Moroni"),
    ("the Democratic Republic of the Congo", "Kinshasa"), ("the Republic of the Congo", "Brazzaville"),
    ("Egypt", "Cairo"), ("Equatorial Guinea", "Malabo"), ("Eritrea", "Asmara"), ("Ethiopia", "Addis Ababa"),
    ("Gabon", "Libreville"), ("the Gambia", "Banjul"), ("Ghana", "Accra"), ("Guinea", "Conakry"),
    ("Kenya", "Nairobi"), ("Lesotho", "Maseru"), ("Liberia", "Monrovia"), ("Libya", "Tripoli"),
    ("Madagascar", "Antananarivo"), ("Malawi", "Lilongwe"), ("Mali", "Bamako"), ("Mauritania", "Nouakchott"),
    ("Mauritius", "Port Louis"), ("Morocco", "Rabat"), ("Mozambique", "Maputo"), ("Namibia", "Windhoek"),
    ("Niger", "Niamey"), ("Nigeria", "Abuja"), ("Rwanda", "Kigali"), ("Senegal", "Dakar"),
    ("Seychelles", "Victoria"), ("Sierra Leone", "Freetown"), ("Somalia", "Mogadishu"), ("South Sudan", "Juba"),
    ("Sudan", "Khartoum"), ("Uganda", "Kampala"), ("Zambia", "Lusaka"), ("Zimbabwe", "Harare"),
    # Americas
    ("Argentina", "Buenos Aires"), ("the Bahamas", "Nassau"), ("Barbados", "Bridgetown"), ("Belize", "Belmopan"),
    ("Canada", "Ottawa"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Dominica", "Roseau"),
    ("the Dominican Republic", "Santo Domingo"), ("Ecuador", "Quito"), ("El Salvador", "San Salvador"),
    ("Guatemala", "Guatemala City"), ("Guyana", "Georgetown"), ("Haiti", "Port-au-Prince"),
    ("Honduras", "Tegucigalpa"), ("Jamaica", "Kingston"), ("Mexico", "Mexico City"), ("Nicaragua", "Managua"),
    ("Panama", "Panama City"), ("Peru", "Lima"), ("Saint Lucia", "Castries"), ("Saint Kitts and Nevis", "Basseterre"),
    ("Suriname", "Paramaribo"), ("Trinidad and Tobago", "Port of Spain"), ("the United States", "Washington"),
    ("Uruguay", "Montevideo"), ("Venezuela", "Caracas"),
    # Oceania
    ("Australia", "Canberra"), ("Fiji", "Suva"), ("Kiribati", "Tarawa"), ("the Marshall Islands", "Majuro"),
    ("Micronesia", "Palikir"), ("New Zealand", "Wellington"), ("Papua New Guinea", "Port Moresby"),
    ("Samoa", "Apia"), ("the Solomon Islands", "Honiara"), ("Tuvalu", "Funafuti"), ("Vanuatu", "Port Vila"),
)  # fmt: skip


def _capital_problem(country: str, capital: str) -> Problem:
    return Problem(
        prompt_id=f"capital:{country}", prompt=f"What is the capital of {country}?", answer=capital
    )


def _held_out_share(items: list, fraction: float, rng: random.Random) -> list:
    """A seeded `fraction` of `items` (at least one, never all) in a seeded order, chosen from a sorted copy so it
    depends on the seed and the items, not on their order."""
    order = sorted(items)
    rng.shuffle(order)
    k = min(len(order) - 1, max(1, round(len(order) * fraction)))
    return order[:k]


def capitals_split(task: CapitalsTask) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training pairs, held-out pairs) of CAPITALS, disjoint, the same for the same eval_seed and eval_fraction;
    the held-out ones in a seeded order, so a smaller eval_size takes countries from every continent."""
    held = _held_out_share(list(CAPITALS), task.eval_fraction, random.Random(task.eval_seed))
    return [c for c in CAPITALS if c not in held], held


def capitals_eval_set(task: CapitalsTask) -> list[Problem]:
    return [_capital_problem(*c) for c in capitals_split(task)[1][: task.eval_size]]


def capitals_stream(task: CapitalsTask, seed: int) -> Iterator[Problem]:
    """Endless training questions: every training country once per round, in a new seeded order each round."""
    train = capitals_split(task)[0]
    rng = random.Random(seed)
    while True:
        order = list(train)
        rng.shuffle(order)
        yield from (_capital_problem(*c) for c in order)


# ------------------------------------------------------------------------------------ word problems
# Templates per operation; {n} is a name, {a} and {b} one-digit numbers. The answer is a+b, a-b or a*b.
WORD_PROBLEMS: dict[str, tuple[str, ...]] = {
    "+": (
        "{n} has {a} apples. {n} buys {b} more apples. How many apples does {n} have now?",
        "There are {a} birds on a tree. {b} more birds land on the tree. How many birds are on the tree now?",
        "{n} read {a} pages in the morning and {b} pages in the evening. How many pages did {n} read in all?",
        "A box has {a} red balls and {b} blue balls. How many balls are in the box?",
        "{n} had {a} stickers and got {b} more from a friend. How many stickers does {n} have now?",
        "On Monday {n} walked {a} kilometres and on Tuesday {b} kilometres. How many kilometres did {n} walk?",
    ),
    "-": (
        "{n} has {a} cookies and eats {b} of them. How many cookies are left?",
        "There are {a} cars in a parking lot. {b} cars drive away. How many cars are still in the parking lot?",
        "{n} had {a} balloons. {b} balloons popped. How many balloons does {n} have left?",
        "A shelf holds {a} books. {n} takes {b} books off the shelf. How many books are on the shelf now?",
        "{n} had {a} dollars and spent {b} dollars on lunch. How many dollars does {n} have left?",
        "There were {a} fish in a pond. {b} fish were caught. How many fish are in the pond now?",
    ),
    "*": (
        "There are {a} boxes with {b} pencils in each box. How many pencils are there in all?",
        "{n} buys {a} packs of gum. Each pack has {b} pieces. How many pieces of gum does {n} have?",
        "A garden has {a} rows of plants with {b} plants in each row. How many plants are in the garden?",
        "Each of {a} children has {b} marbles. How many marbles do the children have together?",
        "{n} reads {b} pages every day for {a} days. How many pages does {n} read?",
        "A table has {a} plates and each plate holds {b} grapes. How many grapes are on the table?",
    ),
}
WORD_PROBLEM_NAMES = ("Tom", "Sara", "Ali", "Mia", "Ben", "Lena", "Omar", "Kate")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _number_pairs(op: str) -> list[tuple[int, int]]:
    """One-digit operands from 2 (no "1 apples"); a subtraction leaves at least 1."""
    return [(a, b) for a in range(2, 10) for b in range(2, 10) if op != "-" or b < a]


@dataclass(frozen=True)
class WordProblemSplit:
    """Per operation: the training and held-out template indices and number pairs."""

    train_templates: dict[str, list[int]]
    held_templates: dict[str, list[int]]
    train_pairs: dict[str, list[tuple[int, int]]]
    held_pairs: dict[str, list[tuple[int, int]]]


def word_problems_split(task: WordProblemsTask) -> WordProblemSplit:
    rng = random.Random(task.eval_seed)
    split = WordProblemSplit({}, {}, {}, {})
    for op, templates in WORD_PROBLEMS.items():
        held_t = set(_held_out_share(list(range(len(templates))), task.eval_fraction, rng))
        held_p = set(_held_out_share(_number_pairs(op), task.eval_fraction, rng))
        split.train_templates[op] = [i for i in range(len(templates)) if i not in held_t]
        split.held_templates[op] = sorted(held_t)
        split.train_pairs[op] = [p for p in _number_pairs(op) if p not in held_p]
        split.held_pairs[op] = [p for p in _number_pairs(op) if p in held_p]
    return split


def _word_problem(op: str, t: int, name: str, a: int, b: int) -> Problem:
    text = WORD_PROBLEMS[op][t].format(n=name, a=a, b=b)
    return Problem(prompt_id=f"word:{op}{t}:{name}:{a}:{b}", prompt=text, answer=str(_APPLY[op](a, b)))


def word_problems_eval_set(task: WordProblemsTask) -> list[Problem]:
    """Held-out problems: a held-out template with any pair, or a training template with a held-out pair; each
    (template, pair) once with a seeded name, in a seeded order, the first eval_size of them."""
    split, rng = word_problems_split(task), random.Random(task.eval_seed + 1)
    pool = []
    for op, templates in WORD_PROBLEMS.items():
        for t in range(len(templates)):
            pairs = _number_pairs(op) if t in split.held_templates[op] else split.held_pairs[op]
            pool += [(op, t, rng.choice(WORD_PROBLEM_NAMES), a, b) for a, b in pairs]
    rng.shuffle(pool)
    return [_word_problem(*spec) for spec in pool[: task.eval_size]]


def word_problems_stream(task: WordProblemsTask, seed: int) -> Iterator[Problem]:
    """Endless training problems: an operation, a training template and a training pair, drawn with `seed`."""
    split, rng = word_problems_split(task), random.Random(seed)
    ops = list(WORD_PROBLEMS)
    while True:
        op = rng.choice(ops)
        a, b = rng.choice(split.train_pairs[op])
        yield _word_problem(op, rng.choice(split.train_templates[op]), rng.choice(WORD_PROBLEM_NAMES), a, b)


# ------------------------------------------------------------------------------------ visual digits
IMAGE_TOKEN = (
    "<image>"  # an image's place in a prompt's text (one per image; a processor expands it to many ids)
)
VISUAL_QUESTION = "What number?"
# A 5x7 dot font for the digits, as rows of 5 bits: drawn by code, so no font file (whose glyphs vary with the
# Pillow build) decides the pixels.
DIGIT_FONT: dict[str, tuple[str, ...]] = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}
VISUAL_ALPHABET = "".join(
    sorted(set(ADDITION_ALPHABET + VISUAL_QUESTION))
)  # every character of prompts/answers


@dataclass(frozen=True)
class DigitImage:
    """What decides one image of the visual task: the number, its top-left corner, ink and background levels."""

    number: str
    x: int
    y: int
    ink: int
    background: int

    @property
    def prompt_id(self) -> str:
        return f"vd:{self.number}:{self.x}:{self.y}:{self.ink}:{self.background}"


def _near_centre(rng: random.Random, room: int, jitter: int) -> int:
    """A corner coordinate within `jitter` pixels of centring the number in `room` spare pixels (kept inside)."""
    centre = room // 2
    return rng.randint(max(0, centre - jitter), min(room, centre + jitter))


def _digit_image(rng: random.Random, task: VisualDigitsTask) -> DigitImage:
    n = rng.randint(1, task.max_digits)
    number = str(rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1))
    width, height = len(number) * 6 * task.scale - task.scale, 7 * task.scale
    return DigitImage(
        number=number,
        x=_near_centre(rng, task.image_size - width, task.jitter),
        y=_near_centre(rng, task.image_size - height, task.jitter),
        ink=rng.randint(160, 255),
        background=rng.randint(0, 80),
    )


def draw_digits(spec: DigitImage, task: VisualDigitsTask) -> bytes:
    """The image of `spec` as PNG bytes: grayscale, image_size square, each font dot a scale x scale square."""
    from PIL import Image, ImageDraw  # only the visual task needs Pillow

    img = Image.new("L", (task.image_size, task.image_size), spec.background)
    draw = ImageDraw.Draw(img)
    s = task.scale
    for k, digit in enumerate(spec.number):
        left = spec.x + k * 6 * s
        for row, bits in enumerate(DIGIT_FONT[digit]):
            for col, bit in enumerate(bits):
                if bit == "1":
                    x0, y0 = left + col * s, spec.y + row * s
                    draw.rectangle((x0, y0, x0 + s - 1, y0 + s - 1), fill=spec.ink)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _visual_problem(spec: DigitImage, task: VisualDigitsTask) -> Problem:
    return Problem(
        prompt_id=spec.prompt_id,
        prompt=IMAGE_TOKEN + VISUAL_QUESTION,
        answer=spec.number,
        images=(draw_digits(spec, task),),
    )


def _visual_eval_specs(task: VisualDigitsTask) -> list[DigitImage]:
    rng = random.Random(task.eval_seed)
    seen: dict[str, DigitImage] = {}
    while len(seen) < task.eval_size:  # millions of distinct images: the loop ends
        spec = _digit_image(rng, task)
        seen.setdefault(spec.prompt_id, spec)
    return list(seen.values())


def visual_digits_eval_set(task: VisualDigitsTask) -> list[Problem]:
    return [_visual_problem(spec, task) for spec in _visual_eval_specs(task)]


def visual_digits_stream(task: VisualDigitsTask, seed: int) -> Iterator[Problem]:
    """Endless training images; held-out ones (the same number, place and levels) are skipped."""
    held_out = {spec.prompt_id for spec in _visual_eval_specs(task)}
    rng = random.Random(seed)
    while True:
        spec = _digit_image(rng, task)
        if spec.prompt_id not in held_out:
            yield _visual_problem(spec, task)


# ------------------------------------------------------------------------------------------ mixture
def _tagged(name: str, p: Problem) -> Problem:
    return dataclasses.replace(p, metadata={**p.metadata, "task": name})


def mixture_eval_set(task: MixtureTask, images: ImagesConfig | None = None) -> list[Problem]:
    """Every task's held-out set, each problem tagged with its task's name, interleaved one task after another
    (an evaluation cut short by its budget still covers every task); a prompt held out by two tasks once."""
    sets = [[_tagged(name, p) for p in eval_set(sub, images)] for name, sub in task.tasks.items()]
    seen: dict[str, Problem] = {}
    for i in range(max(map(len, sets), default=0)):
        for problems in sets:
            if i < len(problems):
                seen.setdefault(problems[i].prompt_id, problems[i])
    return list(seen.values())


def mixture_stream(task: MixtureTask, seed: int, images: ImagesConfig | None = None) -> Iterator[Problem]:
    """Endless training problems: a task drawn by its share, then that task's next problem, tagged with its name.
    A prompt held out by any task of the mixture is skipped (two tasks may make the same prompt)."""
    held_out = {p.prompt_id for p in mixture_eval_set(task, images)}
    shares = task.shares()
    names = [n for n in task.tasks if shares[n] > 0]
    weights = [shares[n] for n in names]
    streams = {n: training_stream(task.tasks[n], seed * 1009 + i, images) for i, n in enumerate(task.tasks)}
    rng = random.Random(seed)
    while True:
        name = rng.choices(names, weights)[0]
        p = next(streams[name])
        if p.prompt_id not in held_out:
            yield _tagged(name, p)


def subtask(task: AnyTask, name: str) -> AnyTask:
    """The task named `name` of a mixture (ValueError naming the choices otherwise)."""
    if task.kind != "mixture" or name not in task.tasks:
        choices = sorted(task.tasks) if task.kind == "mixture" else []
        raise ValueError(f"no task named {name!r} in the task section (its tasks: {choices})")
    return task.tasks[name]


def task_names(task: AnyTask) -> list[str]:
    """The tags a task's problems carry (`metadata["task"]`): a mixture's task names, else none."""
    return list(task.tasks) if task.kind == "mixture" else []


# ------------------------------------------------------------------------------------------- facade
def _styled(task: AnyTask, p: Problem) -> Problem:
    """The task's prompt format, carried by each problem so whoever renders it needs only the tokenizer."""
    return dataclasses.replace(
        p, system_prompt=task.system_prompt, chat_template=task.chat_template == "auto"
    )


def _stream(task: AnyTask, seed: int, images: ImagesConfig | None) -> Iterator[Problem]:
    if task.kind == "addition":
        return addition_stream(task, seed)
    if task.kind == "reversal":
        return reversal_stream(task, seed)
    if task.kind == "capitals":
        return capitals_stream(task, seed)
    if task.kind == "word_problems":
        return word_problems_stream(task, seed)
    if task.kind == "visual_digits":
        return visual_digits_stream(task, seed)
    return jsonl_stream(task, seed, images)


def training_stream(task: AnyTask, seed: int, images: ImagesConfig | None = None) -> Iterator[Problem]:
    """Endless training problems of `task`; `images` (the config's images section, its defaults when None) is
    what a JSONL file's images are checked against."""
    if task.kind == "mixture":
        return mixture_stream(task, seed, images)  # each task styles its own problems
    return (_styled(task, p) for p in _stream(task, seed, images))


def eval_set(task: AnyTask, images: ImagesConfig | None = None) -> list[Problem]:
    """The held-out problems of `task` (`images` as for training_stream)."""
    if task.kind == "mixture":
        return mixture_eval_set(task, images)
    if task.kind == "addition":
        problems = addition_eval_set(task)
    elif task.kind == "reversal":
        problems = reversal_eval_set(task)
    elif task.kind == "capitals":
        problems = capitals_eval_set(task)
    elif task.kind == "word_problems":
        problems = word_problems_eval_set(task)
    elif task.kind == "visual_digits":
        problems = visual_digits_eval_set(task)
    elif task.eval_path is None:
        return []
    else:
        problems = read_jsonl_problems(task.eval_path, images)[: task.eval_size]
    return [_styled(task, p) for p in problems]


def verifier_mode(task: AnyTask) -> str:
    """The verifier name of the task (a built-in name or `module:function`; see opd/verifiers.py); a mixture's
    tasks share one."""
    return task.verifier if task.kind == "mixture" else verifier_of(task)
