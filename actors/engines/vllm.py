"""The vLLM student engine (`actor.engine: vllm`): vLLM samples, our weight broadcast feeds it.

Behaviour logprobs: the engine runs with `logprobs_mode="processed_logprobs"`, which in vLLM's sampler is the
log-softmax of the logits after the temperature division (and after top-k/top-p, which the config keeps off for
this engine: `sampling.top_p < 1` is refused). That is exactly our convention, log_softmax(raw logits / T) of the
sampled token. `raw_logprobs` would be taken before the temperature (right only at T = 1).

Weights: the broadcast lands in `self.model`, a CPU (or `actor.device`) Hugging Face copy of the student whose
parameter names, shapes and dtypes match the learner's manifest. Before each generation batch, if the version
moved, those tensors are handed to vLLM's worker through `collective_rpc` (in process, no copy on the way) and
loaded with the model's `load_weights`; the prefix cache is then reset unless `actor.keep_kv_cache`. In batch
generation weights therefore change only between batches, so `policy_version` describes every token and
`token_versions` stays unset.

Streaming (`actor.generation: stream`): `start` adds a request to vLLM's own scheduler
(`llm_engine.add_request`, the sequence's own `SamplingParams(seed=Request.seed)`, delta outputs), each `step` is
one `llm_engine.step()` (admit, prefill, one decode over everything running) and returns the sequences that
finished in it. The engine is built without vLLM's asynchronous scheduling there, so a step's forward runs
inside its `step()` call and no step scheduled ahead survives a weight push: the tokens a step returns were
sampled by the weights vLLM held during it, and are stamped with that version. `sync_weights(version)` between
steps applies `actor.on_new_weights` to the sequences in flight:
- continue: the weights are loaded under the running requests; their KV cache, computed by the older weights
  for the prompt and the tokens so far, is kept, so their next tokens come from the new weights reading
  old-weight keys and values (cheap, not exactly any one version's distribution: the behaviour logprob is
  still the one vLLM sampled with, so the importance ratio stays correct). vLLM cannot reset its prefix cache
  under running requests (the reset refuses; with `reset_running_requests` it would preempt and recompute
  them all, which is `recompute`), so the reset waits until vLLM next holds no request, and sequences started
  meanwhile do not read the cache (`skip_reading_prefix_cache`): no new sequence starts from old-weight blocks.
  Requests queued but not yet admitted at the update may still read them (only when vLLM's max_num_seqs or KV
  space is full).
- recompute: every sequence in flight is aborted and re-added with prompt + its tokens as the prompt and the
  tokens it has left as max_tokens: the new weights re-prefill it, its tokens, behaviour logprobs and versions
  so far are kept, and each token's behaviour logprob is exactly its version's. The re-added request samples
  with a seed derived from the sequence's seed and length (`_continued_seed`): vLLM's per-request generator
  cannot be carried over, and the plain seed would restart its stream and replay the draws of the first
  tokens at later positions. A sequence is thus reproducible given its seed and the steps its updates landed
  at, but it is not the sequence it would have been without the update.
- restart: every sequence in flight is aborted and re-added from its prompt with its own seed, its tokens
  dropped: all of its tokens carry the new version.
With recompute and restart the abort comes before the push, so nothing runs and the prefix cache resets at once.
`abort` drops everything in flight (actor.on_stop: drop).

Images (a vision-language student, LLaVA): `sample` takes each prompt's images (the actor's `PromptImages`,
read for their encoded `blobs`) and hands vLLM the prompt with one image id per image and the images as
`multi_modal_data`; vLLM expands the placeholders itself, and its expansion must equal the prompt's expanded ids
(what the trajectory carries and the learner reads), which is checked (streaming: a `Request`'s images the same
way, checked at each attempt's first output; a recomputed sequence is re-added with its images, its tokens after
them). Weight pushes send the in-memory names;
vLLM's LLaVA maps them onto its own (opd.models.vllm_support); with `student.freeze_vision` only the language
model's tensors are sent, the vision tower and projector never changing.
The image placeholder id is never sampled (in a response it would be read as a slot for image features), as in the
HF engine; vLLM applies the ban (a logit bias of -100, its largest) before its processed logprobs, so behaviour
logprobs here are renormalised over the other ids, where the HF sampler's are the model's unbanned ones: they
differ by -log(1 - p(image id)), nothing for a trained model (which gives it ~0 mass), ~0.03 nats for an
untrained tiny one. After every push vLLM's encoder cache
(image embeddings) is reset: they were computed by the old vision tower.

Padded vocabularies: a checkpoint may have more output rows than its tokenizer has ids (Qwen's 151,936 rows for
151,665 ids). vLLM samples over every row it does not count as its own tensor-parallel padding, so after building
the engine its logits are cut to the tokenizer's real vocabulary (`opd.models.vocab.limit_vllm_vocab`, the cut
the vLLM teacher makes): padding is never sampled and the processed behaviour logprobs are renormalised over the
real ids, like the HF sampler's and the learner's. The cut lives in vLLM's logits processor, which a weight push
does not rebuild.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch

from actors.engines.request import Request
from opd.config import Config
from opd.models.builds import Assets, load_asset
from opd.models.prompts import stop_token_ids
from opd.models.sampler import Sample
from opd.models.vision import load_vision
from opd.models.vllm_support import (
    WORKER_EXTENSION,
    check_expanded,
    image_limit,
    make_llm,
    mm_prompt,
    pushed_weights,
)
from opd.models.vocab import limit_vllm_vocab, real_vocab
from opd.runtime.lifecycle import log


def _continued_seed(seed: int, sampled: int) -> int:
    """The seed a sequence re-added after `sampled` tokens samples with (module docstring, streaming): a function
    of its own seed and its length, so reproducible, and a fresh random stream, so no draw is replayed."""
    digest = hashlib.blake2b(f"{seed}:{sampled}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


@dataclass
class _Sequence:
    """A request in flight: what it has sampled so far, under which weight versions, and its current vLLM id
    (a new one each time it is re-added)."""

    request: Request
    vllm_id: str = ""
    attempts: int = 0
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    unchecked: list[int] | None = None  # images: the expansion vLLM must report, until its first output

    def sample(self, finish_reason: str | None) -> Sample:
        return Sample(
            response_ids=self.ids,
            behaviour_logprobs=self.logprobs,
            finish_reason="stop" if finish_reason == "stop" else "length",
            token_versions=self.versions,
        )


def _sample_logprobs(token_ids: list[int], logprobs) -> list[float]:
    """The logprob of each sampled token from vLLM's per-position {token_id: Logprob} maps."""
    if logprobs is None or len(logprobs) != len(token_ids):
        raise RuntimeError(
            f"vLLM returned {0 if logprobs is None else len(logprobs)} logprob entries for {len(token_ids)} tokens"
        )
    return [float(pos[tok].logprob) for tok, pos in zip(token_ids, logprobs, strict=True)]


class VLLMEngine:
    def __init__(self, cfg: Config, assets: Assets):
        self.cfg = cfg
        # The receive buffer for the weight broadcast, and the tokenizer every component uses.
        self.model, self.tokenizer = load_asset(assets.student, cfg.actor.device)
        self.model.eval()
        # the chat template's end-of-turn token (EOS without one), and EOS where that is another token:
        # generation stops at the first of them and keeps it
        self.stop_ids = stop_token_ids(self.tokenizer, cfg.task.chat_template == "auto")
        stream = cfg.actor.generation == "stream"
        t0 = time.perf_counter()
        self.llm = make_llm(
            cfg.actor.vllm,
            assets.student.path,
            dtype=assets.student.dtype,
            device=cfg.actor.device,
            seed=cfg.run.seed,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            enable_prefix_caching=True,
            # stream: each step() runs its own forward, so weights pushed between steps sample its tokens
            **({"async_scheduling": False} if stream else {}),
            **image_limit(assets.student.path, cfg.images.max_per_prompt),
        )
        if stream and self.llm.llm_engine.vllm_config.scheduler_config.async_scheduling:
            raise ValueError(
                "actor.generation: stream needs vLLM's synchronous scheduling (a step scheduled ahead would sample "
                "with the weights of before an update): drop async_scheduling from actor.vllm.engine_kwargs"
            )
        self.vision = load_vision(assets.student.path)  # None for a text-only student
        # the image placeholder is never sampled (module docstring): vLLM's largest bias, exp(-100) of its mass
        self.logit_bias = {self.vision.image_token_id: -100.0} if self.vision is not None else None
        # sample over the tokenizer's ids only (padding rows beyond it are never produced by any tokenizer)
        self.vocab = real_vocab(self.model)
        self.llm.collective_rpc(limit_vllm_vocab, args=(self.vocab,))
        log.info("vLLM student engine up in %.1fs (vocab %d)", time.perf_counter() - t0, self.vocab)
        self.version = 0  # the asset's weights are version 0, as for the HF engine
        self.pushes = 0
        self._live: dict[str, _Sequence] = {}  # stream: by Request.key, started and not yet returned
        self._by_vllm_id: dict[str, _Sequence] = {}
        self._stale_prefix = False  # prefix cache holds blocks of older weights that could not be reset yet
        self.tokens_dropped = 0  # tokens thrown away by on_new_weights: restart (the actor counts them)

    def push_weights(self) -> None:
        """Load the tensors in `self.model` into vLLM; then drop KV computed by the old weights unless asked not to."""
        named = pushed_weights(self.model, getattr(self.cfg.student, "freeze_vision", False))
        self.llm.collective_rpc("opd_load_weights", args=(named,))
        if not self.cfg.actor.keep_kv_cache:
            self._reset_prefix_cache()
        if self.vision is not None:
            # cached image embeddings were computed by the old vision tower; and a reload leaves vLLM's scheduler
            # believing in encoder outputs its worker no longer holds ("Encoder cache miss"), whatever the setting
            self.llm.llm_engine.reset_encoder_cache()
        self.pushes += 1

    def _reset_prefix_cache(self) -> None:
        """Forget the cached KV blocks, or, while sequences run (stream, on_new_weights: continue), mark them stale.

        vLLM's reset refuses (a warning, nothing done) while any running request holds blocks, and its
        `reset_running_requests=True` preempts every running request to recompute it: `recompute`, not `continue`.
        So a `continue` update with sequences in flight leaves the cache as it is and sequences started from then
        on skip reading it (`skip_reading_prefix_cache`), until vLLM next holds no request and the reset is done."""
        if self.llm.llm_engine.get_num_unfinished_requests():
            self._stale_prefix = True
        else:
            self._stale_prefix = not self.llm.reset_prefix_cache()

    def sync_weights(self, version: int) -> None:
        """Use the weights in `self.model` from the next step on, if `version` is new. In flight (stream) the
        sequences then follow `actor.on_new_weights` (module docstring); tokens sampled from here on carry
        `version`."""
        if version == self.version:
            return
        mode = self.cfg.actor.on_new_weights
        redo = list(self._live.values()) if mode != "continue" else []
        if redo:  # aborted first, so the push finds no running request and the prefix cache resets
            self.llm.llm_engine.abort_request([seq.vllm_id for seq in redo])
            self._by_vllm_id.clear()
        self.push_weights()
        self.version = version
        for seq in redo:
            if mode == "restart":
                self.tokens_dropped += len(seq.ids)
                seq.ids, seq.logprobs, seq.versions = [], [], []
            self._submit(seq)

    def _params(self, seed: int, max_tokens: int, **extra):
        from vllm import SamplingParams  # noqa: PLC0415 (optional dependency)

        s = self.cfg.sampling
        return SamplingParams(
            n=1,
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=max_tokens,
            logprobs=0,  # only the sampled token's logprob
            seed=seed,
            stop_token_ids=list(self.stop_ids),
            detokenize=False,
            logit_bias=self.logit_bias,
            **extra,
        )

    def sample(
        self, prompts: list[list[int]], generator: torch.Generator, images: list | None = None
    ) -> list[Sample]:
        """`images[i]`: prompt i's images (anything with `.blobs`, the actor's PromptImages) or None."""
        s = self.cfg.sampling
        # per-request seeds drawn from the actor's generator: reproducible runs, distinct samples per prompt
        base = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        # repeated prompts (sampling.n) must not share a seed
        params = [self._params(base + i, s.max_new_tokens) for i in range(len(prompts))]
        blobs = [im.blobs if im is not None else None for im in images or [None] * len(prompts)]
        max_pixels = self.cfg.images.max_pixels
        requests = [mm_prompt(self.vision, p, b, max_pixels) for p, b in zip(prompts, blobs, strict=True)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        samples = []
        for out, prompt, b in zip(outputs, prompts, blobs, strict=True):
            if b:
                check_expanded(out, prompt, "vLLM student")
            comp = out.outputs[0]
            ids = list(comp.token_ids)
            samples.append(
                Sample(
                    response_ids=ids,
                    behaviour_logprobs=_sample_logprobs(ids, comp.logprobs),
                    finish_reason="stop" if comp.finish_reason == "stop" else "length",
                )
            )
        return samples

    # ---- streaming (actor.generation: stream): vLLM's scheduler, one step() per decode step ----

    def start(self, request: Request) -> None:
        """Queue one sequence in vLLM's scheduler; it is prefilled at the next step."""
        if request.key in self._live:
            raise ValueError(f"sequence {request.key!r} is already in flight")
        seq = _Sequence(request)
        self._submit(seq)
        self._live[request.key] = seq

    def _submit(self, seq: _Sequence) -> None:
        """Hand `seq` to vLLM: its prompt followed by the tokens it keeps, for the tokens it has left."""
        from vllm.sampling_params import RequestOutputKind  # noqa: PLC0415 (optional dependency)

        req = seq.request
        blobs = req.images.blobs if req.images is not None else None
        prompt = mm_prompt(self.vision, req.prompt_ids, blobs, self.cfg.images.max_pixels, tail=seq.ids)
        if self._stale_prefix and not self.llm.llm_engine.get_num_unfinished_requests():
            self._reset_prefix_cache()
        params = self._params(
            req.seed if not seq.ids else _continued_seed(req.seed, len(seq.ids)),
            self.cfg.sampling.max_new_tokens - len(seq.ids),
            output_kind=RequestOutputKind.DELTA,  # each step's new tokens and their logprobs only
            skip_reading_prefix_cache=True if self._stale_prefix else None,
        )
        seq.attempts += 1
        seq.vllm_id = f"{req.key}#{seq.attempts}"  # an aborted attempt's id is never reused
        seq.unchecked = req.prompt_ids + seq.ids if blobs else None
        self.llm.llm_engine.add_request(seq.vllm_id, prompt, params)
        self._by_vllm_id[seq.vllm_id] = seq

    def step(self) -> list[tuple[str, Sample]]:
        """One vLLM step (admits queued sequences, one decode over the running ones); the sequences that finished
        in it, their tokens stamped with the version each was sampled under."""
        if not self._live:
            return []
        finished = []
        for out in self.llm.llm_engine.step():
            seq = self._by_vllm_id.get(out.request_id)
            if seq is None:
                continue
            if seq.unchecked is not None:
                check_expanded(out, seq.unchecked, "vLLM student")
                seq.unchecked = None
            comp = out.outputs[0]
            new = list(comp.token_ids)
            seq.ids += new
            seq.logprobs += _sample_logprobs(new, comp.logprobs)
            seq.versions += [self.version] * len(new)  # this step's forward ran on self.version's weights
            if out.finished:
                del self._by_vllm_id[seq.vllm_id], self._live[seq.request.key]
                finished.append((seq.request.key, seq.sample(comp.finish_reason)))
        return finished

    def inflight(self) -> int:
        return len(self._live)

    def abort(self) -> int:
        """Drop every sequence in flight (actor.on_stop: drop); returns how many."""
        dropped = len(self._live)
        if self._by_vllm_id:
            self.llm.llm_engine.abort_request(list(self._by_vllm_id))
        self._live.clear()
        self._by_vllm_id.clear()
        return dropped

    def close(self) -> None:
        self.llm = None  # vLLM's in-process engine shuts down with the object
