"""Random but valid scored trajectories and a tiny float model, for engine tests without a running system."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opd.protocol import Trajectory

VOCAB = 16


def tiny_model(seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def _logprobs(rng: np.random.Generator, shape) -> np.ndarray:
    logits = rng.normal(size=(*shape, VOCAB))
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def scored_trajectories(n: int, seed: int = 0, topk: int = 4, group_size: int = 2, lag: int = 0):
    """n trajectories of varied lengths with behaviour, teacher and top-k logprobs, rewards and groups."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        P, T = int(rng.integers(2, 6)), int(rng.integers(1, 9))
        resp = rng.integers(3, VOCAB, size=T).astype(np.int32)
        b = _logprobs(rng, (T,))[np.arange(T), resp]
        teacher = _logprobs(rng, (T,))
        order = np.argsort(-teacher, axis=-1)[:, :topk]
        out.append(
            Trajectory(
                run_id="t",
                prompt_id=f"p{i // group_size}",
                group_id=f"g{i // group_size}",
                sample_index=i % group_size,
                prompt_token_ids=np.concatenate([[1], rng.integers(3, VOCAB, size=P - 1)]).astype(np.int32),
                response_token_ids=resp,
                behaviour_logprobs=b.astype(np.float32),
                policy_version=0,
                teacher_logprobs=teacher[np.arange(T), resp].astype(np.float32),
                teacher_topk_ids=order.astype(np.int32) if topk else None,
                teacher_topk_logprobs=np.take_along_axis(teacher, order, -1).astype(np.float32)
                if topk
                else None,
                reward=float(rng.integers(0, 2)),
            )
        )
    return out
