"""What the server teachers (`scorer.engine: remote`, one file per `scorer.remote.api`) share: one JSON-over-HTTP
attempt that classifies its failures, the checks every reply goes through, and the backend that sends one request
per trajectory, at most `scorer.remote.max_concurrency` in flight (the server batches them itself).

Servers are asked to score the token ids they are given (prompt + response, no generation) and to return the
logprob of every input token plus the top-k at each position. Ids travel as ids, never as text, so the server must
hold a model with the student's tokenizer: neither API exposes the vocabulary, so that is the user's promise,
stated in the README. Both servers compute prompt logprobs as log-softmax of the raw logits (temperature 1; the
config refuses any other `scorer.temperature` with `engine: remote`), and return only the top-k, so the tail
mass (`teacher_tail_logprobs`) stays None and the learner falls back to 1 - sum(exp(top-k)).

Ids are bounded by the student tokenizer's real vocabulary (opd.models.vocab), not the checkpoint's padded
embedding rows. A server's logprobs are over whatever rows its model has: the padding rows' mass cannot be cut
from here (a trained checkpoint puts next to none on them), but a top-k id in them is refused, saying so.

Images (a vision-language student's trajectories): only an API that takes them sends them (`takes_images`;
SGLang's `image_data`); the others refuse such a trajectory, not retried, rather than score it blind. The wire's
prompt ids are expanded (one image id per image feature); a server expands each placeholder itself, so it is sent
one image id per image (opd.models.image_prompts), and the logprob positions stay those of the expanded prompt.

Nothing here retries or remembers: a failed trajectory is reported in `PartlyScored` with a `TeacherError` that
says whether asking again may help, and the scorer's retry policy decides what happens next.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from opd.config import Config, RemoteTeacherConfig
from opd.images import ImageBlob, ImageError
from opd.models.builds import Assets
from opd.models.image_prompts import collapsed_prompt
from opd.models.loading import load_tokenizer
from opd.models.vision import load_vision
from opd.models.vocab import padding_note, tokenizer_vocab
from opd.protocol import Trajectory
from teacher_scorers.backends.base import PartlyScored, TeacherError
from teacher_scorers.backends.common import attach, teacher_prompts

_MAX_LOGPROB = 1e-3  # a log-probability is <= 0; this allows float rounding and nothing more
_RETRYABLE_STATUS = (408, 429)  # besides 5xx: the server says "not now", not "your request is wrong"
_ERROR_BODY_CHARS = 500


@dataclass
class Scores:
    logprobs: np.ndarray  # float32 (T,): teacher logprob of each response token
    topk_ids: np.ndarray | None  # int32 (T, k)
    topk_logprobs: np.ndarray | None  # float32 (T, k)


def _server_message(resp: httpx.Response) -> str:
    """The server's own words: SGLang and vLLM put them under `error`/`message`/`detail` in a JSON body."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:_ERROR_BODY_CHARS]
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message", value)
            if value:
                return str(value)[:_ERROR_BODY_CHARS]
    return str(body)[:_ERROR_BODY_CHARS]


class HttpJson:
    """One JSON request per call, with a timeout. Failures are `TeacherError`s: retryable when they may heal
    themselves (connection errors, timeouts, 408/429, 5xx), not when the request is at fault (other 4xx) or the
    reply is not JSON."""

    def __init__(self, rc: RemoteTeacherConfig, api_key: str | None):
        self.timeout_s, self.url = rc.timeout_s, rc.url or ""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(rc.timeout_s),
            limits=httpx.Limits(
                max_connections=rc.max_concurrency, max_keepalive_connections=rc.max_concurrency
            ),
        )

    def request(self, method: str, path: str, body: Any, what: str) -> Any:
        where = f"{self.url}{path} for {what}"
        try:
            resp = self.client.request(method, path, json=body)
        except httpx.TimeoutException:
            raise TeacherError(
                where, f"timed out after {self.timeout_s}s (scorer.remote.timeout_s)", retryable=True
            ) from None
        except httpx.TransportError as exc:
            raise TeacherError(where, f"{type(exc).__name__}: {exc}", retryable=True) from None
        if resp.status_code >= 500 or resp.status_code in _RETRYABLE_STATUS:
            raise TeacherError(where, f"HTTP {resp.status_code}: {_server_message(resp)}", retryable=True)
        if resp.status_code >= 400:
            raise TeacherError(
                where, f"HTTP {resp.status_code} (not retried): {_server_message(resp)}", retryable=False
            )
        try:
            return resp.json()
        except ValueError:
            raise TeacherError(
                where, f"malformed reply: body is not JSON: {resp.text[:200]!r}", retryable=False
            ) from None

    def close(self) -> None:
        self.client.close()


class Reply:
    """Reads one server reply for one trajectory; every complaint names the field, the server and the id.

    A malformed reply is not retryable: a server that answers with the wrong thing will answer it again."""

    def __init__(self, where: str, vocab_size: int):
        self.where, self.vocab_size = where, vocab_size

    def bad(self, msg: str) -> TeacherError:
        return TeacherError(self.where, f"malformed reply: {msg}", retryable=False)

    def field(self, obj: Any, key: str, kind: type | tuple[type, ...], path: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise self.bad(f"{path} is missing")
        value = obj[key]
        if not isinstance(value, kind):
            raise self.bad(f"{path} is {type(value).__name__}, expected {getattr(kind, '__name__', kind)}")
        return value

    def logprob(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.bad(f"{path} is {value!r}, expected a number")
        if math.isnan(value) or value > _MAX_LOGPROB:
            raise self.bad(f"{path} is {value!r}, not a log-probability (finite and <= 0)")
        return float(value)  # -inf (probability 0) is allowed: it is floored when attached

    def token_id(self, value: Any, path: str) -> int:
        if isinstance(value, str) and value.lstrip("-").isdigit():
            value = int(value)  # vLLM keys its logprob maps by the id as a string
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.bad(f"{path} is {value!r}, not a token id in [0, {self.vocab_size})")
        if value >= self.vocab_size:
            note = padding_note(self.vocab_size)
            raise self.bad(f"{path} is {value!r}, not a token id in [0, {self.vocab_size}) ({note})")
        return value

    def length(self, items: list, n: int, path: str) -> None:
        if len(items) != n:
            raise self.bad(f"{path} has {len(items)} entries, expected {n}")


class HttpTeacher:
    """A TeacherBackend that asks a server instead of running a model here. A subclass is one server API:
    `path` (the scoring endpoint), `body` (the request for one trajectory), `parse` (its reply into `Scores`)
    and `describe` (asks what the server serves, returns the teacher id)."""

    path: str
    takes_images = False  # whether `with_images` can send a trajectory's images to this API

    def __init__(self, cfg: Config, assets: Assets):
        from transformers import AutoConfig  # noqa: PLC0415 (heavy; only the student's config is read)

        self.cfg, self.rc = cfg, cfg.scorer.remote
        self.topk = cfg.scorer.topk
        # Ids are checked against the student's real vocabulary: the student produced them, and the teacher is
        # required to share its tokenizer. Its tokenizer's ids, capped by the student's (maybe padded) rows. A
        # teacher of another tokenizer (`tokenizer: different`) is sent its own ids (the cross-tokenizer wrapper
        # re-tokenises the text), so its replies are checked against its own tokenizer, named by the teacher
        # section (teacher.tokenizer or teacher.name_or_path: the server's model's tokenizer, kept locally).
        if cfg.scorer.tokenizer == "different":
            student_tok = load_tokenizer(assets.teacher.tokenizer)
            self.vocab_size = tokenizer_vocab(student_tok)
        else:
            student_tok = load_tokenizer(assets.student.tokenizer)
            config = AutoConfig.from_pretrained(assets.student.path)
            rows = int(
                getattr(config, "vocab_size", None) or config.get_text_config().vocab_size
            )  # a VLM's is
            self.vocab_size = min(tokenizer_vocab(student_tok), rows)  # its text config's
        # a vision-language student's processor: its image id and how many ids each image expands to
        self.vision = load_vision(assets.student.path) if cfg.scorer.tokenizer != "different" else None
        self.max_len: int | None = None  # the server's context length, where its API tells it
        # with scorer.context the server gets the context's ids in front of the student's turns (its own prefix
        # cache reuses them); the student's tokenizer renders them, the teacher being required to share it
        self.prompts = None
        if cfg.scorer.context is not None:
            self.prompts = teacher_prompts(cfg, student_tok)
        self.http = HttpJson(self.rc, _api_key(self.rc))
        self.pool = ThreadPoolExecutor(
            max_workers=self.rc.max_concurrency, thread_name_prefix="remote-teacher"
        )
        try:
            self.teacher_id = self.describe()
        except BaseException:
            self.close()  # the scorer may build us again (a retryable start-up failure): leave nothing open
            raise

    def describe(self) -> str:
        raise NotImplementedError

    def body(self, prompt: list[int], response: list[int], k: int) -> dict[str, Any]:
        raise NotImplementedError

    def parse(self, reply: Any, prompt: list[int], response: list[int], k: int, r: Reply) -> Scores:
        raise NotImplementedError

    def with_images(
        self, body: dict[str, Any], prompt: list[int], response: list[int], images: list[ImageBlob]
    ) -> dict[str, Any]:
        """`body` (the request for the expanded prompt) carrying the images instead: `prompt` has one image id
        per image, in the images' order."""
        raise NotImplementedError

    def _image_prompt(self, prompt: list[int], images: list[ImageBlob], where: str) -> list[int]:
        """The prompt with one image id per image, for `with_images`; TeacherError (not retried) when this API
        cannot take images or the ids and images disagree."""
        if not self.takes_images:
            raise TeacherError(
                where,
                f"the trajectory has {len(images)} image(s) but scorer.remote.api: {self.cfg.scorer.remote.api} "
                "sends token ids only; use api: sglang (image_data), or scorer.engine: hf / vllm",
                retryable=False,
            )
        if self.vision is None:
            raise TeacherError(
                where,
                f"the trajectory has {len(images)} image(s) but the student is a text-only model",
                retryable=False,
            )
        try:
            return collapsed_prompt(self.vision, prompt, images, self.cfg.images.max_pixels)
        except ImageError as exc:
            raise TeacherError(where, f"bad images: {exc}", retryable=False) from None

    def score_one(self, t: Trajectory) -> Scores:
        prompt, response = t.prompt_token_ids.tolist(), t.response_token_ids.tolist()
        where = f"{self.http.url}{self.path} for trajectory {t.id}"
        if self.prompts is not None:
            try:
                prompt = self.prompts.teacher_ids(prompt)
            except ValueError as exc:
                raise TeacherError(where, str(exc), retryable=False) from None
        if not prompt:
            raise TeacherError(where, "empty prompt; a remote teacher needs one token", retryable=False)
        if self.max_len is not None and len(prompt) + len(response) >= self.max_len:
            raise TeacherError(
                where,
                f"{len(prompt) + len(response)} tokens; the server scores at most {self.max_len - 1} "
                "(raise its --max-model-len)",
                retryable=False,
            )
        k = min(self.topk, self.vocab_size)
        if not response:
            empty = np.zeros((0, k), dtype=np.float32)
            return Scores(
                np.zeros(0, np.float32), empty.astype(np.int32) if k else None, empty if k else None
            )
        body = self.body(prompt, response, k)
        if t.images:
            body = self.with_images(body, self._image_prompt(prompt, t.images, where), response, t.images)
        elif self.vision is not None and self.vision.image_token_id in prompt:
            raise TeacherError(
                where, "the prompt holds image ids but the trajectory no images", retryable=False
            )
        reply = self.http.request("POST", self.path, body, f"trajectory {t.id}")
        return self.parse(reply, prompt, response, k, Reply(where, self.vocab_size))

    def score(self, trajs: list[Trajectory]) -> None:
        """One request per trajectory, all in flight together up to the pool's size. Each answered one is
        attached; the others are reported together once every request has finished."""
        futures = [self.pool.submit(self.score_one, t) for t in trajs]
        failures: dict[int, Exception] = {}
        for i, (t, fut) in enumerate(zip(trajs, futures, strict=True)):
            try:
                s = fut.result()
            except Exception as exc:  # this trajectory's failure: reported with the batch below
                failures[i] = exc
                continue
            attach(t, s.logprobs, s.topk_ids, s.topk_logprobs, self.teacher_id, 1.0)
        if failures:
            raise PartlyScored(failures, len(trajs))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()


def _api_key(rc: RemoteTeacherConfig) -> str | None:
    if rc.api_key_env is None:
        return None
    if not os.environ.get(rc.api_key_env):
        raise TeacherError(
            "scorer.remote.api_key_env",
            f"{rc.api_key_env} is not set in the scorer's environment; export it before starting the run",
            retryable=False,
        )
    return os.environ[rc.api_key_env]
