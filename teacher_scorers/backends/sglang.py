"""A teacher behind an SGLang server (`scorer.engine: remote`, `scorer.remote.api: sglang`): its native
`/generate`, asked to score the ids it is given without generating.

Images go as SGLang's `image_data`: one string per image, in placeholder order, each a data URI
("data:image/png;base64,...") of the image's own encoded bytes, as sent (never re-encoded). SGLang expands each
image placeholder in `input_ids` itself (its multimodal processor, from the image), so the request carries one
image id per image (the wire's expanded ids collapsed: opd.models.image_prompts), and `logprob_start_len` counts
positions of the expanded prompt, as the server does once it has expanded it. SGLang decodes `input_ids` to text
and re-tokenizes it for a multimodal request unless started with SGLANG_MM_AVOID_RETOKENIZE=1 (which keeps the
ids and expands the placeholders in place); a re-tokenization that changes the response's ids is caught by the
token-id check in `parse`, not scored.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from opd.images import ImageBlob
from opd.runtime.lifecycle import log
from teacher_scorers.backends.http import HttpTeacher, Reply, Scores


class SGLangTeacher(HttpTeacher):
    """`input_token_logprobs` covers input positions logprob_start_len.. as [logprob, token_id, text-or-null]; its
    first entry's logprob is always null (nothing in the request predicts that token), so starting at the
    prompt's last token puts response token t at entry t+1. `input_top_logprobs` has the same layout with a list
    of k such triples per entry (null first)."""

    path = "/generate"
    takes_images = True

    def describe(self) -> str:
        info = self.http.request("GET", "/get_model_info", None, "the model info request")
        name = info.get("model_path") if isinstance(info, dict) else None
        log.info("remote teacher: SGLang at %s serving %s", self.rc.url, name)
        return f"sglang:{self.rc.url}:{name or 'unknown'}"

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

    def with_images(
        self, body: dict[str, Any], prompt: list[int], response: list[int], images: list[ImageBlob]
    ) -> dict[str, Any]:
        return {**body, "input_ids": prompt + response, "image_data": [data_uri(b) for b in images]}

    def parse(self, reply: Any, prompt: list[int], response: list[int], k: int, r: Reply) -> Scores:
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


def data_uri(blob: ImageBlob) -> str:
    """The image as SGLang's `image_data` takes it: a base64 data URI of the blob's bytes, typed by its format."""
    return f"data:image/{blob.format};base64,{base64.b64encode(blob.data).decode('ascii')}"
