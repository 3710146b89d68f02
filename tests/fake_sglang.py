"""A stand-in for an SGLang server (which cannot run here): a real HTTP server speaking SGLang's native wire format
for the part a scorer uses, with the logprobs computed by a real Hugging Face model, so values can be compared.

- `GET /get_model_info` -> {"model_path", "tokenizer_path", "is_generation"}
- `POST /generate` with `input_ids`, `sampling_params.max_new_tokens: 0`, `return_logprob`, `logprob_start_len`,
  `top_logprobs_num`, `return_text_in_logprobs` -> {"text", "meta_info"} where `meta_info.input_token_logprobs`
  lists [logprob, token_id, null] for input positions logprob_start_len.. with the first logprob null (SGLang pads
  it: no position in the request predicts that token), `input_top_logprobs` the same with k triples per entry
  (null first), logprobs at temperature 1 of the raw logits as SGLang computes them.
- Errors as SGLang's HTTP server sends them: {"error": {"message": ...}} with the status code.
- A vision-language model (a saved LLaVA) also takes `image_data`: a list of data URIs
  ("data:image/png;base64,..." or image/jpeg), one per image placeholder id in `input_ids`, in order. As SGLang
  does, the server expands each placeholder itself with the model's processor (into 16 ids for the tiny VLM,
  keeping the request's other ids as they are: SGLang with SGLANG_MM_AVOID_RETOKENIZE=1) and runs the model with
  the images' pixel values; `logprob_start_len` and the returned positions count the EXPANDED prompt. Placeholders
  and images that differ in number get HTTP 400 with SGLang's message, as does an image that is not a data URI
  of a PNG/JPEG or does not decode. A request without `image_data` is scored as text (as SGLang does).

Tests inject faults through `FakeSGLang.faults` (a queue of actions, one per request). Also runnable by hand:
`python -m tests.fake_sglang --model DIR --port 30000`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import math
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from opd.images import ImageBlob, ImageError
from opd.models import vlm
from opd.models.vision import load_vision

_DATA_URI_PREFIXES = ("data:image/png;base64,", "data:image/jpeg;base64,")


class FakeSGLang:
    def __init__(self, model_dir: str, port: int = 0):
        from transformers import AutoModelForCausalLM

        self.model_dir = model_dir
        self.vision = load_vision(model_dir)  # None for a text-only model
        if self.vision is not None:
            self.model = vlm.load_vlm(model_dir)[0].eval()
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.lock = (
            threading.Lock()
        )  # one forward at a time: the torch model is shared by the handler threads
        self.faults: deque[str] = (
            deque()
        )  # e.g. "500", "400", "sleep:1.5", "drop:input_token_logprobs", "nan"
        self.poison: dict[tuple[int, ...], str] = {}  # input_ids -> a fault applied to every reply for them
        self.delay_s = 0.0  # added to every /generate, to observe concurrency
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.httpd = ThreadingHTTPServer(
            ("127.0.0.1", port), type("Handler", (_Handler,), {"server_state": self})
        )
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> FakeSGLang:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------ SGLang semantics
    @torch.no_grad()
    def generate(self, req: dict[str, Any]) -> dict[str, Any]:
        ids = req["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
            raise ValueError("input_ids must be a non-empty list of ints (one request)")
        if req.get("sampling_params", {}).get("max_new_tokens", 128) != 0:
            raise ValueError("this fake only scores: sampling_params.max_new_tokens must be 0")
        ids, pixels = self.expand_images(ids, req.get("image_data"))
        start = req.get("logprob_start_len", -1)
        k = req.get("top_logprobs_num", 0) or 0
        with self.lock:
            logits = (
                self.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0].float()
            )  # (L, V)
        logp = torch.log_softmax(
            logits, -1
        )  # temperature 1, raw logits: what SGLang returns for input tokens
        meta: dict[str, Any] = {
            "id": f"fake-{len(self.requests)}",
            "finish_reason": {"type": "length", "length": 0},
            "prompt_tokens": len(ids),
            "completion_tokens": 0,
            "cached_tokens": 0,
        }
        if req.get("return_logprob"):
            if start < 0:
                start = len(ids)  # SGLang's default: output tokens only
            tok = [[None, ids[start], None]] if start < len(ids) else []
            tok += [[float(logp[i - 1, ids[i]]), ids[i], None] for i in range(start + 1, len(ids))]
            meta["input_token_logprobs"] = tok
            meta["output_token_logprobs"] = []
            if k > 0:
                top: list[Any] = [None] if start < len(ids) else []
                for i in range(start + 1, len(ids)):
                    vals, idx = logp[i - 1].topk(k)
                    top.append([[float(v), int(j), None] for v, j in zip(vals, idx, strict=True)])
                meta["input_top_logprobs"] = top
                meta["output_top_logprobs"] = []
        return {"text": "", "meta_info": meta}

    def expand_images(self, ids: list[int], image_data: Any) -> tuple[list[int], torch.Tensor | None]:
        """The request's ids with each image placeholder expanded by the processor, and the images' pixel values;
        ValueError (HTTP 400) for images that cannot be used or do not match the placeholders."""
        if image_data is None:
            return ids, None
        if isinstance(image_data, str):
            image_data = [image_data]  # SGLang takes one image as a bare string too
        if not isinstance(image_data, list) or not image_data:
            raise ValueError("image_data must be a data URI or a non-empty list of them")
        if self.vision is None:
            raise ValueError(f"image_data given but {self.model_dir} is not a multimodal model")
        blobs = [_decode_image(i, uri) for i, uri in enumerate(image_data)]
        held = sum(1 for t in ids if t == self.vision.image_token_id)
        if held != len(blobs):
            raise ValueError(
                f"prompt has {held} image placeholder token(s) but {len(blobs)} image(s) were provided"
            )
        try:
            expanded, pixels = self.vision.expand(ids, blobs)
        except ImageError as exc:
            raise ValueError(f"An exception occurred while loading IMAGE data: {exc}") from None
        return expanded, pixels


def _decode_image(index: int, uri: Any) -> ImageBlob:
    """One `image_data` entry: a base64 data URI of PNG or JPEG bytes (what the scorer sends), checked."""
    if not isinstance(uri, str) or not uri.startswith(_DATA_URI_PREFIXES):
        raise ValueError(f"image_data[{index}] is not a data:image/png or data:image/jpeg base64 URI")
    try:
        data = base64.b64decode(uri.split(",", 1)[1], validate=True)
        blob = ImageBlob.of(data)
    except (binascii.Error, ImageError) as exc:
        raise ValueError(f"An exception occurred while loading IMAGE data at index {index}: {exc}") from None
    if not uri.startswith(f"data:image/{blob.format};"):
        raise ValueError(
            f"image_data[{index}] is declared {uri.split(';', 1)[0]} but holds {blob.format} bytes"
        )
    return blob


def _corrupt(reply: dict[str, Any], fault: str) -> None:
    """Make a reply wrong in one named way, as a buggy or mismatched server would."""
    meta = reply["meta_info"]
    if fault == "drop_meta":
        reply.pop("meta_info")
    elif fault.startswith("drop:"):
        meta.pop(fault.split(":", 1)[1])
    elif fault == "short":
        meta["input_token_logprobs"].pop()
    elif fault == "nan":
        meta["input_token_logprobs"][-1][0] = math.nan
    elif fault == "wrong_id":
        meta["input_token_logprobs"][-1][1] += 1
    elif fault == "topk_short":
        meta["input_top_logprobs"][-1].pop()
    elif fault == "topk_bad_id":
        meta["input_top_logprobs"][-1][0][1] = 10**9


class _Handler(BaseHTTPRequestHandler):
    server_state: FakeSGLang  # set per server by a subclass made in FakeSGLang.__init__

    def log_message(self, *args) -> None:  # quiet: the test output is the place for failures
        pass

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()  # NaN is written as NaN, as Python-based servers do
        self._leave()  # before the reply goes out: the client may send its next request the moment it lands
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/get_model_info":
            self._send(
                200,
                {
                    "model_path": self.server_state.model_dir,
                    "tokenizer_path": self.server_state.model_dir,
                    "is_generation": True,
                },
            )
        elif self.path == "/health":
            self._send(200, {})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        try:
            req = json.loads(self.rfile.read(length))
        except ValueError:
            self._send(400, {"error": {"message": "body is not JSON"}})
            return
        if self.path != "/generate":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        with self.server_state.lock:
            self.server_state.requests.append({"body": req, "auth": self.headers.get("Authorization")})
            fault = self.server_state.faults.popleft() if self.server_state.faults else ""
            fault = fault or self.server_state.poison.get(tuple(req.get("input_ids") or ()), "")
            self.server_state.in_flight += 1
            self.server_state.max_in_flight = max(
                self.server_state.max_in_flight, self.server_state.in_flight
            )
            self._counted = True
        try:
            self._answer(req, fault)
        finally:
            self._leave()

    def _leave(self) -> None:
        """This request no longer counts as in flight (once, whichever path ends it)."""
        with self.server_state.lock:
            if getattr(self, "_counted", False):
                self._counted = False
                self.server_state.in_flight -= 1

    def _answer(self, req: dict[str, Any], fault: str) -> None:
        time.sleep(self.server_state.delay_s)
        if fault.startswith("sleep:"):
            time.sleep(float(fault.split(":", 1)[1]))
        if fault in ("500", "503", "400", "429"):
            self._send(int(fault), {"error": {"message": f"injected HTTP {fault}"}})
            return
        try:
            reply = self.server_state.generate(req)
        except (ValueError, KeyError, IndexError) as exc:
            self._send(400, {"error": {"message": str(exc)}})
            return
        if fault and not fault.startswith("sleep:"):
            _corrupt(reply, fault)
        self._send(200, reply)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--port", type=int, default=30000)
    args = ap.parse_args()
    server = FakeSGLang(args.model, args.port)
    print(f"fake SGLang serving {args.model} on {server.url}", flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
