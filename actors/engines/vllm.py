"""The vLLM student engine (`actor.engine: vllm`): vLLM samples, our weight broadcast feeds it.

Behaviour logprobs: the engine runs with `logprobs_mode="processed_logprobs"`, which in vLLM's sampler is the
log-softmax of the logits after the temperature division (and after top-k/top-p, which the config keeps off for
this engine: `sampling.top_p < 1` is refused). That is exactly our convention, log_softmax(raw logits / T) of the
sampled token. `raw_logprobs` would be taken before the temperature (right only at T = 1).

Weights: the broadcast lands in `self.model`, a CPU (or `actor.device`) Hugging Face copy of the student whose
parameter names, shapes and dtypes match the learner's manifest. Before each generation batch, if the version
moved, those tensors are handed to vLLM's worker through `collective_rpc` (in process, no copy on the way) and
loaded with the model's `load_weights`; the prefix cache is then reset unless `actor.keep_kv_cache`. Weights
therefore change only between generation batches, so `policy_version` describes every token and
`token_versions` stays unset.

Images (a vision-language student, LLaVA): `sample` takes each prompt's images (the actor's `PromptImages`,
read for their encoded `blobs`) and hands vLLM the prompt with one image id per image and the images as
`multi_modal_data`; vLLM expands the placeholders itself, and its expansion must equal the prompt's expanded ids
(what the trajectory carries and the learner reads), which is checked. Weight pushes send the in-memory names;
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

import time

import torch

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
            **image_limit(assets.student.path, cfg.images.max_per_prompt),
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

    def push_weights(self) -> None:
        """Load the tensors in `self.model` into vLLM; then drop KV computed by the old weights unless asked not to."""
        named = pushed_weights(self.model, getattr(self.cfg.student, "freeze_vision", False))
        self.llm.collective_rpc("opd_load_weights", args=(named,))
        if not self.cfg.actor.keep_kv_cache:
            self.llm.reset_prefix_cache()
        if self.vision is not None:
            # cached image embeddings were computed by the old vision tower; and a reload leaves vLLM's scheduler
            # believing in encoder outputs its worker no longer holds ("Encoder cache miss"), whatever the setting
            self.llm.llm_engine.reset_encoder_cache()
        self.pushes += 1

    def sync_weights(self, version: int) -> None:
        if version != self.version:
            self.push_weights()
            self.version = version

    def sample(
        self, prompts: list[list[int]], generator: torch.Generator, images: list | None = None
    ) -> list[Sample]:
        """`images[i]`: prompt i's images (anything with `.blobs`, the actor's PromptImages) or None."""
        from vllm import SamplingParams  # noqa: PLC0415 (optional dependency)

        s = self.cfg.sampling
        # per-request seeds drawn from the actor's generator: reproducible runs, distinct samples per prompt
        base = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        params = [
            SamplingParams(
                n=1,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_new_tokens,
                logprobs=0,  # only the sampled token's logprob
                seed=base + i,  # repeated prompts (sampling.n) must not share a seed
                stop_token_ids=list(self.stop_ids),
                detokenize=False,
                logit_bias=self.logit_bias,
            )
            for i in range(len(prompts))
        ]
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

    def close(self) -> None:
        self.llm = None  # vLLM's in-process engine shuts down with the object
