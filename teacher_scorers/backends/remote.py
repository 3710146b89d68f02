"""A teacher behind an HTTP server: SGLang's native `/generate` or vLLM's OpenAI-compatible `/v1/completions`.

Both servers are asked to score token ids they are given (prompt + response, no generation) and to return the
logprob of every input token plus the top-k at each position. Token ids travel as ids, never as text, so the
server must hold a model with the student's tokenizer: that cannot be checked from here (neither API exposes
the vocabulary), so it is the user's promise, stated in the README.

Both servers compute these prompt logprobs as log-softmax of the raw logits, i.e. at temperature 1; the config
refuses any other `scorer.temperature` with `engine: remote`.

One request per trajectory, at most `max_concurrency` in flight; the server batches them itself. A failure of
any trajectory makes `score` raise, which puts the batch on the scorer's existing path: scored one by one, the
bad one retried through the broker and dead-lettered, the rest flowing.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from opd.config import Config, RemoteTeacherConfig
from opd.models.builds import Assets
from opd.protocol import Trajectory
from opd.runtime.lifecycle import log
from teacher_scorers.backends import attach

_MAX_LOGPROB = 1e-3  # a log-probability is <= 0; this allows float rounding and nothing more
_RETRY_STATUS = (408, 429)  # besides 5xx: the server says "not now", not "your request is wrong"
_MAX_BACKOFF_S = 30.0
_ERROR_BODY_CHARS = 500


class RemoteTeacherError(RuntimeError):
    """The teacher server refused, kept failing, or replied with something that is not the scores we asked for."""


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
    """JSON over HTTP with a timeout per attempt and retries with exponential backoff on what may heal itself
    (connection errors, timeouts, 408/429, 5xx). A 4xx is the request's fault: retrying cannot fix it, so it is
    raised at once with the server's message."""

    def __init__(
        self, rc: RemoteTeacherConfig, api_key: str | None, sleep: Callable[[float], None] = time.sleep
    ):
        self.rc, self.url, self.sleep = rc, rc.url or "", sleep
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
        attempts = self.rc.retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                delay = min(self.rc.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S)
                # jitter: scorers that failed together do not come back together
                self.sleep(delay * random.uniform(0.8, 1.2))
            try:
                resp = self.client.request(method, path, json=body)
            except httpx.TimeoutException:
                last = f"timed out after {self.rc.timeout_s}s (scorer.remote.timeout_s)"
                continue
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code >= 500 or resp.status_code in _RETRY_STATUS:
                last = f"HTTP {resp.status_code}: {_server_message(resp)}"
                continue
            if resp.status_code >= 400:
                raise RemoteTeacherError(
                    f"{self.url}{path} refused {what} with HTTP {resp.status_code} (not retried): "
                    f"{_server_message(resp)}"
                )
            try:
                return resp.json()
            except ValueError:
                raise RemoteTeacherError(
                    f"{self.url}{path}: malformed reply for {what}: body is not JSON: {resp.text[:200]!r}"
                ) from None
        raise RemoteTeacherError(f"{self.url}{path}: {what} failed after {attempts} attempt(s); last: {last}")

    def close(self) -> None:
        self.client.close()


# ------------------------------------------------------------------------------------------ reply checks
class _Reply:
    """Reads one server reply for one trajectory; every complaint names the field, the server and the id."""

    def __init__(self, where: str, vocab_size: int):
        self.where, self.vocab_size = where, vocab_size

    def bad(self, msg: str) -> RemoteTeacherError:
        return RemoteTeacherError(f"malformed reply from {self.where}: {msg}")

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
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
            raise self.bad(f"{path} is {value!r}, not a token id in [0, {self.vocab_size})")
        return value

    def length(self, items: list, n: int, path: str) -> None:
        if len(items) != n:
            raise self.bad(f"{path} has {len(items)} entries, expected {n}")


# ------------------------------------------------------------------------------------------ SGLang
class SGLangApi:
    """SGLang native `/generate`. `input_token_logprobs` covers input positions logprob_start_len.. as
    [logprob, token_id, text-or-null]; its first entry's logprob is always null (nothing in the request predicts
    that token), so starting at the prompt's last token puts response token t at entry t+1. `input_top_logprobs`
    has the same layout with a list of k such triples per entry (null first)."""

    path = "/generate"

    def __init__(self, rc: RemoteTeacherConfig):
        self.rc = rc

    def body(self, prompt: list[int], response: list[int], k: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "input_ids": prompt + response,
            "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
            "return_logprob": True,
            "logprob_start_len": len(prompt) - 1,
            "return_text_in_logprobs": False,
        }
        if k:
            body["top_logprobs_num"] = k
        return body

    def parse(self, reply: Any, response: list[int], k: int, r: _Reply) -> Scores:
        meta = r.field(reply, "meta_info", dict, "meta_info")
        entries = r.field(meta, "input_token_logprobs", list, "meta_info.input_token_logprobs")
        T = len(response)
        r.length(entries, T + 1, "meta_info.input_token_logprobs")
        lp = np.empty(T, dtype=np.float32)
        for t, tok in enumerate(response):
            path = f"meta_info.input_token_logprobs[{t + 1}]"
            entry = entries[t + 1]
            if not isinstance(entry, list) or len(entry) < 2:
                raise r.bad(f"{path} is {entry!r}, expected [logprob, token_id, text]")
            if r.token_id(entry[1], f"{path}[1]") != tok:
                raise r.bad(f"{path}[1] is token {entry[1]}, but response token {t} is {tok}")
            lp[t] = r.logprob(entry[0], f"{path}[0]")
        if not k:
            return Scores(lp, None, None)
        top = r.field(meta, "input_top_logprobs", list, "meta_info.input_top_logprobs")
        r.length(top, T + 1, "meta_info.input_top_logprobs")
        ids = np.empty((T, k), dtype=np.int32)
        vals = np.empty((T, k), dtype=np.float32)
        for t in range(T):
            path = f"meta_info.input_top_logprobs[{t + 1}]"
            row = top[t + 1]
            if not isinstance(row, list):
                raise r.bad(f"{path} is {row!r}, expected a list of [logprob, token_id, text]")
            r.length(row, k, path)
            for j, item in enumerate(row):
                if not isinstance(item, list) or len(item) < 2:
                    raise r.bad(f"{path}[{j}] is {item!r}, expected [logprob, token_id, text]")
                vals[t, j] = r.logprob(item[0], f"{path}[{j}][0]")
                ids[t, j] = r.token_id(item[1], f"{path}[{j}][1]")
        return Scores(lp, ids, vals)


# ------------------------------------------------------------------------------------------ vLLM (OpenAI API)
class OpenAIApi:
    """vLLM's `/v1/completions` with the prompt as token ids, `echo` and `max_tokens: 0` (score, do not
    generate) and vLLM's `prompt_logprobs: k`. `choices[0].prompt_logprobs` has one entry per prompt token:
    null first, then a map keyed by token id (as a string) to {logprob, rank, decoded_token} holding the top-k
    and the prompt token itself (k or k+1 entries)."""

    path = "/v1/completions"

    def __init__(self, rc: RemoteTeacherConfig):
        self.rc = rc

    def body(self, prompt: list[int], response: list[int], k: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": prompt + response,
            "max_tokens": 0,
            "echo": True,
            "prompt_logprobs": k,
            "temperature": 1.0,
            "return_token_ids": True,  # the echoed prompt ids let us check nothing was re-tokenised or cut
        }
        if self.rc.model:
            body["model"] = self.rc.model
        return body

    def parse(self, reply: Any, prompt: list[int], response: list[int], k: int, r: _Reply) -> Scores:
        choices = r.field(reply, "choices", list, "choices")
        if not choices:
            raise r.bad("choices is empty")
        choice = choices[0]
        echoed = choice.get("prompt_token_ids") if isinstance(choice, dict) else None
        if echoed is not None and echoed != prompt + response:
            raise r.bad(
                "choices[0].prompt_token_ids differ from the ids sent (the server truncated or re-tokenised)"
            )
        entries = r.field(choice, "prompt_logprobs", list, "choices[0].prompt_logprobs")
        P, T = len(prompt), len(response)
        r.length(entries, P + T, "choices[0].prompt_logprobs")
        lp = np.empty(T, dtype=np.float32)
        ids = np.empty((T, k), dtype=np.int32)
        vals = np.empty((T, k), dtype=np.float32)
        for t, tok in enumerate(response):
            path = f"choices[0].prompt_logprobs[{P + t}]"
            entry = entries[P + t]
            if not isinstance(entry, dict):
                raise r.bad(f"{path} is {entry!r}, expected a map of token id to logprob")
            seen = {}
            for key, info in entry.items():
                seen[r.token_id(key, f"{path} key")] = r.logprob(
                    r.field(info, "logprob", (int, float), f"{path}[{key}].logprob"), f"{path}[{key}].logprob"
                )
            if tok not in seen:
                raise r.bad(
                    f"{path} has no entry for response token {t} (id {tok}); it has ids {sorted(seen)}"
                )
            lp[t] = seen[tok]
            if not k <= len(seen) <= k + 1:
                raise r.bad(f"{path} has {len(seen)} entries, expected the top {k} plus the prompt token")
            # the extra entry, if any, is the response token ranked below the top k
            best = sorted(seen.items(), key=lambda kv: -kv[1])[:k]
            ids[t] = [i for i, _ in best]
            vals[t] = [v for _, v in best]
        return Scores(lp, ids if k else None, vals if k else None)


# ------------------------------------------------------------------------------------------ the backend
class RemoteTeacher:
    """`scorer.engine: remote`: the TeacherBackend that asks a server instead of running a model here."""

    def __init__(self, cfg: Config, assets: Assets):
        from transformers import AutoConfig

        self.cfg, rc = cfg, cfg.scorer.remote
        self.topk = cfg.scorer.topk
        # Ids are checked against the student's vocabulary: the student produced them, and the teacher is
        # required to share its tokenizer.
        self.vocab_size = int(AutoConfig.from_pretrained(assets.student.path).vocab_size)
        self.http = HttpJson(rc, _api_key(rc))
        self.api = SGLangApi(rc) if rc.api == "sglang" else OpenAIApi(rc)
        self.pool = ThreadPoolExecutor(max_workers=rc.max_concurrency, thread_name_prefix="remote-teacher")
        self.max_len: int | None = None
        self._kept: dict[str, Scores] = {}  # scores of a failed batch's good trajectories, by id
        self.teacher_id = self._describe_server()

    def _describe_server(self) -> str:
        """Ask the server what it serves: names the teacher on every scored trajectory, checks `model`, and
        learns vLLM's context length so an over-long trajectory fails alone with a clear reason."""
        rc = self.cfg.scorer.remote
        if rc.api == "sglang":
            info = self.http.request("GET", "/get_model_info", None, "the model info request")
            name = info.get("model_path") if isinstance(info, dict) else None
            log.info("remote teacher: SGLang at %s serving %s", rc.url, name)
            return f"sglang:{rc.url}:{name or 'unknown'}"
        models = self.http.request("GET", "/v1/models", None, "the model list request")
        served = (
            {
                m["id"]: m
                for m in models.get("data", [])
                if isinstance(m, dict) and isinstance(m.get("id"), str)
            }
            if isinstance(models, dict)
            else {}
        )
        if rc.model is not None and rc.model not in served:
            raise RemoteTeacherError(
                f"{rc.url} serves {sorted(served)}, not scorer.remote.model {rc.model!r}; set it to one of those"
            )
        if rc.model is None and len(served) != 1:
            raise RemoteTeacherError(
                f"{rc.url} serves {sorted(served)}; set scorer.remote.model to one of them"
            )
        name = rc.model or next(iter(served))
        max_len = served[name].get("max_model_len")
        self.max_len = int(max_len) if isinstance(max_len, int) else None
        log.info("remote teacher: vLLM at %s serving %s (max_model_len %s)", rc.url, name, self.max_len)
        return f"openai:{rc.url}:{name}"

    def score_one(self, t: Trajectory) -> Scores:
        prompt, response = t.prompt_token_ids.tolist(), t.response_token_ids.tolist()
        where = f"{self.http.url}{self.api.path} for trajectory {t.id}"
        if not prompt:
            raise RemoteTeacherError(
                f"trajectory {t.id} has an empty prompt; a remote teacher needs one token"
            )
        if self.max_len is not None and len(prompt) + len(response) >= self.max_len:
            raise RemoteTeacherError(
                f"trajectory {t.id} has {len(prompt) + len(response)} tokens; {self.http.url} serves at most "
                f"{self.max_len - 1} to score (raise the server's --max-model-len)"
            )
        k = min(self.topk, self.vocab_size)
        if not response:
            empty = np.zeros((0, k), dtype=np.float32)
            return Scores(
                np.zeros(0, np.float32), empty.astype(np.int32) if k else None, empty if k else None
            )
        reply = self.http.request(
            "POST", self.api.path, self.api.body(prompt, response, k), f"trajectory {t.id}"
        )
        r = _Reply(where, self.vocab_size)
        if isinstance(self.api, SGLangApi):
            return self.api.parse(reply, response, k, r)
        return self.api.parse(reply, prompt, response, k, r)

    def score(self, trajs: list[Trajectory]) -> None:
        """Score all, one request each. If any fails, raise once every request has finished, keeping the
        others' scores: the scorer then retries the batch one trajectory at a time, and those are answered from
        here instead of asking the server again."""
        if len(trajs) > 1:
            self._kept = {}  # a new batch: the one-by-one pass over the previous failed batch is over
        futures = [self.pool.submit(self._cached_or_score, t) for t in trajs]
        done, errors = {}, []
        for t, fut in zip(trajs, futures, strict=True):
            try:
                done[t.id] = fut.result()
            except Exception as exc:  # the server's failure on this trajectory; reported below
                errors.append(exc)
        if errors:
            self._kept.update(done)
            if len(errors) == 1:
                raise errors[0]
            raise RemoteTeacherError(f"{len(errors)} of {len(trajs)} trajectories failed; first: {errors[0]}")
        for t in trajs:
            s = done[t.id]
            attach(t, s.logprobs, s.topk_ids, s.topk_logprobs, self.teacher_id, 1.0)

    def _cached_or_score(self, t: Trajectory) -> Scores:
        kept = self._kept.pop(t.id, None)  # dict.pop is atomic under the GIL
        return kept if kept is not None else self.score_one(t)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()


def _api_key(rc: RemoteTeacherConfig) -> str | None:
    if rc.api_key_env is None:
        return None
    key = os.environ.get(rc.api_key_env)
    if not key:
        raise RemoteTeacherError(
            f"scorer.remote.api_key_env is {rc.api_key_env}, but that variable is not set in the scorer's "
            "environment; export it before starting the run"
        )
    return key
