"""A teacher behind vLLM's OpenAI-compatible server (`scorer.engine: remote`, `scorer.remote.api: openai`):
`/v1/completions` with the prompt as token ids, asked to score them without generating."""

from __future__ import annotations

from typing import Any

import numpy as np

from opd.runtime.lifecycle import log
from teacher_scorers.backends.base import TeacherError
from teacher_scorers.backends.http import HttpTeacher, Reply, Scores


class OpenAITeacher(HttpTeacher):
    """`echo` and `max_tokens: 0` (score, do not generate) and vLLM's `prompt_logprobs: k`.
    `choices[0].prompt_logprobs` has one entry per prompt token: null first, then a map keyed by token id (as a
    string) to {logprob, rank, decoded_token} holding the top-k and the prompt token itself (k or k+1 entries)."""

    path = "/v1/completions"

    def describe(self) -> str:
        """Names the teacher, checks `scorer.remote.model` and learns the server's context length, so that an
        over-long trajectory fails alone with a clear reason."""
        rc = self.rc
        models = self.http.request("GET", "/v1/models", None, "the model list request")
        data = models.get("data", []) if isinstance(models, dict) else []
        served = {m["id"]: m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)}
        if rc.model is not None and rc.model not in served:
            raise TeacherError(
                f"{rc.url}/v1/models",
                f"serves {sorted(served)}, not scorer.remote.model {rc.model!r}; set it to one of those",
                retryable=False,
            )
        if rc.model is None and len(served) != 1:
            raise TeacherError(
                f"{rc.url}/v1/models",
                f"serves {sorted(served)}; set scorer.remote.model to one of them",
                retryable=False,
            )
        name = rc.model or next(iter(served))
        max_len = served[name].get("max_model_len")
        self.max_len = int(max_len) if isinstance(max_len, int) else None
        log.info("remote teacher: vLLM at %s serving %s (max_model_len %s)", rc.url, name, self.max_len)
        return f"openai:{rc.url}:{name}"

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

    def parse(self, reply: Any, prompt: list[int], response: list[int], k: int, r: Reply) -> Scores:
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
