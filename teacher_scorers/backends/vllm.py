"""The vLLM teacher (`scorer.engine: vllm`): prompt logprobs of prompt + response ids, top-k included.

Each trajectory is sent as one prompt of token ids (never text, detokenisation off) with `prompt_logprobs=k`;
vLLM returns, for every prompt position, the logprob of the token actually there plus the k most likely ones.
The response rows are our teacher logprobs. vLLM computes prompt logprobs from the model's final logits with no
sampling processors (and so no temperature); for `scorer.temperature != 1` the engine's LogitsProcessor scale
is set to 1/T through `collective_rpc`, which divides those same logits by T before the log-softmax.
Trajectories go in length buckets under `scorer.max_tokens_per_batch`, like the HF teacher, so a batch of short
answers is not held up behind a long one and vLLM's step budget follows ours.

The checkpoint's padded embedding rows (opd.models.vocab) are cut from vLLM's logits at start-up
(`limit_vllm_vocab`), so the logprobs are renormalised over the tokenizer's real ids and no top-k id is padding,
as with the HF teacher; `response_rows` still refuses a padding id, should a vLLM version ignore the cut.

Images (a vision-language teacher, LLaVA): each trajectory's images go to vLLM as multimodal inputs
(`multi_modal_data: {"image": [PIL images]}`) with one image id per image in `prompt_token_ids`: vLLM's processor
expands each placeholder itself (opd.models.vllm_support.mm_prompt), and its expansion is checked against the
trajectory's expanded ids, so the response rows sit where ours do.

vLLM returns only the top-k, not the full distribution, so `teacher_tail_logprobs` stays None: the learner then
falls back to 1 - sum(exp(top-k)) for the tail, which is exact enough unless the teacher is very confident.
"""

from __future__ import annotations

import time

import numpy as np

from opd.config import Config
from opd.images import ImageError
from opd.models.builds import Assets
from opd.models.loading import load_tokenizer
from opd.models.vision import check_same_vision, load_vision
from opd.models.vllm_support import WORKER_EXTENSION, check_expanded, image_limit, make_llm, mm_prompt
from opd.models.vocab import limit_vllm_vocab, padding_reason, tokenizer_vocab
from opd.protocol import Trajectory
from opd.runtime.lifecycle import log
from teacher_scorers.backends.base import PartlyScored
from teacher_scorers.backends.common import (
    attach,
    check_teacher_tokenizer,
    length_buckets,
    teacher_inputs,
    teacher_prompts,
)


def response_rows(
    prompt_logprobs: list, prompt_len: int, response: list[int], topk: int, vocab: int | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Sampled-token logprobs (T,) and top-k ids/logprobs (T, k) of the response positions of one request.

    `prompt_logprobs[j]` is vLLM's {token_id: Logprob} map for position j (None at j = 0); it always holds the
    actual token, plus the top-k by rank (the actual token may be one of them or an extra entry). A top-k id at
    or above `vocab` (a padding row) is refused."""
    rows = prompt_logprobs[prompt_len : prompt_len + len(response)]
    if len(rows) != len(response) or any(r is None for r in rows):
        raise RuntimeError(
            f"vLLM returned {len(rows)} prompt-logprob rows for {len(response)} response tokens"
        )
    lp = np.array([row[tok].logprob for row, tok in zip(rows, response, strict=True)], dtype=np.float32)
    if topk == 0:
        return lp, None, None
    ids = np.zeros((len(response), topk), dtype=np.int32)
    vals = np.zeros((len(response), topk), dtype=np.float32)
    for i, row in enumerate(rows):
        ranked = sorted(((v.rank, tid, v.logprob) for tid, v in row.items() if v.rank <= topk))[:topk]
        if len(ranked) != topk:
            raise RuntimeError(f"vLLM returned {len(ranked)} top-k entries where {topk} were asked for")
        ids[i] = [tid for _, tid, _ in ranked]
        vals[i] = [logprob for _, _, logprob in ranked]
    if vocab is not None and ids.size and int(ids.max()) >= vocab:
        raise RuntimeError(
            f"vLLM returned a top-k id outside the vocabulary: {padding_reason(int(ids.max()), vocab)}"
        )
    return lp, ids, vals


class VLLMTeacher:
    def __init__(self, cfg: Config, assets: Assets):
        self.cfg = cfg
        sc = cfg.scorer
        self.tokenizer = load_tokenizer(assets.teacher.tokenizer)
        check_teacher_tokenizer(cfg, assets, self.tokenizer)
        self.prompts = teacher_prompts(cfg, self.tokenizer)  # with scorer.context: the context's ids in front
        t0 = time.perf_counter()
        self.llm = make_llm(
            sc.vllm,
            assets.teacher.path,
            dtype=assets.teacher.dtype,
            device=sc.device,
            seed=cfg.run.seed,
            max_logprobs=max(20, sc.topk),
            worker_extension_cls=WORKER_EXTENSION,
            **image_limit(assets.teacher.path, cfg.images.max_per_prompt),
        )
        self.vision = load_vision(assets.teacher.path)  # None for a text-only teacher
        check_same_vision(
            load_vision(assets.student.path), self.vision
        )  # reads the images as the student does
        if sc.temperature != 1.0:
            self.llm.collective_rpc("opd_set_logit_scale", args=(1.0 / sc.temperature,))
        # the tokenizer's ids, not the checkpoint's padded rows: cut in vLLM's logits (module docstring)
        self.vocab_size = min(
            tokenizer_vocab(self.tokenizer), self.llm.llm_engine.model_config.get_vocab_size()
        )
        self.llm.collective_rpc(limit_vllm_vocab, args=(self.vocab_size,))
        self.teacher_id = assets.teacher.path
        log.info("vLLM teacher up in %.1fs (vocab %d)", time.perf_counter() - t0, self.vocab_size)

    def score(self, trajs: list[Trajectory]) -> None:
        from vllm import SamplingParams  # noqa: PLC0415 (optional dependency)

        sc = self.cfg.scorer
        # max_tokens=1: vLLM decodes at least one token; it is thrown away. k=0 still returns the actual token.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=sc.topk, detokenize=False)
        # the full teacher input every time: a shared context is vLLM's prefix cache's to reuse
        seqs, failures = teacher_inputs(self.prompts, trajs)
        requests = {}
        for i, t in enumerate(trajs):
            if i in failures:
                continue
            try:
                requests[i] = mm_prompt(
                    self.vision, seqs[i][0], t.images, self.cfg.images.max_pixels, seqs[i][1]
                )
            except ImageError as exc:
                failures[i] = ValueError(f"trajectory {t.id}: {exc}")
        for bucket in length_buckets(
            list(requests), sc.max_tokens_per_batch, lambda i: len(seqs[i][0]) + len(seqs[i][1])
        ):
            outputs = self.llm.generate([requests[i] for i in bucket], params, use_tqdm=False)
            for i, out in zip(bucket, outputs, strict=True):
                prompt, response = seqs[i]
                if trajs[i].images:
                    check_expanded(out, prompt + response, f"trajectory {trajs[i].id}")
                lp, ids, vals = response_rows(
                    out.prompt_logprobs, len(prompt), response, sc.topk, self.vocab_size
                )
                attach(trajs[i], lp, ids, vals, self.teacher_id, sc.temperature)
        if failures:
            raise PartlyScored(failures, len(trajs))
