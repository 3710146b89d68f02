"""Time per scoring batch of the HF teacher with and without `scorer.prefix_cache` (the shared context's KV cache
computed once and reused), on a teacher of your choice, and check that both give the same logprobs.

    OMP_NUM_THREADS=1 python benchmarks/teacher_prefix_cache.py --model /work/smollm2/hf --shots 4
    OMP_NUM_THREADS=1 python benchmarks/teacher_prefix_cache.py --model opd/demo_models/teacher-2244dacc7769

A model with a chat template gets a system prompt and `--shots` capital-city examples as its context; one
without (the demo's character models) gets `--shots` addition examples. Prompts are the task's, responses random
ids of `--response` tokens ended by the stop token, as a batch of `--batch`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opd import tasks  # noqa: E402
from opd.config import load_config  # noqa: E402
from opd.models.builds import ensure_assets  # noqa: E402
from opd.models.loading import load_tokenizer  # noqa: E402
from opd.models.prompts import has_template, prompt_ids, stop_token_id  # noqa: E402
from opd.protocol import Trajectory  # noqa: E402
from teacher_scorers.backends.hf import HFTeacher  # noqa: E402

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Italy", "Rome"),
            ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Spain", "Madrid"), ("Chile", "Santiago"), ("Greece", "Athens")]  # fmt: skip
SYSTEM = (
    "You are a geography expert. Answer every question about a capital city with the city's name only, spelled "
    "as in English, with no other words, no punctuation and no explanation."
)


def _setup(model: str, shots: int, tmp: Path, context: bool):
    chat = has_template(load_tokenizer(model))
    if chat:
        rows = [{"prompt": f"What is the capital of {c}?"} for c, _ in CAPITALS]
        few = [{"user": f"What is the capital of {c}?", "assistant": a} for c, a in CAPITALS[-shots:]]
        ctx = {"system_prompt": SYSTEM, "few_shot": few}
    else:
        rows = [{"prompt": f"{a}+{b}="} for a, b in ((3, 4), (12, 9), (57, 68), (99, 1), (5, 40), (31, 7))]
        ctx = {"few_shot": [{"user": f"{a}+{a}=", "assistant": str(2 * a)} for a in range(10, 10 + shots)]}
    train = tmp / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["task.kind=jsonl", f"task.train_path={train}", "student.kind=pretrained", f"student.name_or_path={model}",
            "teacher.kind=pretrained", f"teacher.name_or_path={model}", ]  # fmt: skip
    return load_config(None, base + ([f"scorer.context={json.dumps(ctx)}"] if context else []))


def _batch(tok, cfg, n: int, response: int, seed: int) -> list[Trajectory]:
    rng = np.random.default_rng(seed)
    stream = tasks.training_stream(cfg.task, seed=seed)
    end = stop_token_id(tok, True)
    out = []
    for i in range(n):
        resp = [*rng.integers(100 if len(tok) > 1000 else 5, len(tok) - 1, size=response - 1).tolist(), end]
        out.append(
            Trajectory(
                run_id="b", prompt_id=str(i), group_id=str(i), sample_index=0,
                prompt_token_ids=np.asarray(prompt_ids(tok, next(stream)), dtype=np.int32),
                response_token_ids=np.asarray(resp, dtype=np.int32),
                behaviour_logprobs=np.zeros(len(resp), dtype=np.float32), policy_version=0,
            )
        )  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument(
        "--no-context",
        action="store_true",
        help="no scorer.context: only the template's system turn is shared",
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--response", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _setup(args.model, args.shots, Path(tmp), not args.no_context)
        assets = ensure_assets(cfg, log=lambda *_: None)
        teachers = {}
        for cache in (True, False):
            c = cfg.model_copy(deep=True)
            c.scorer.prefix_cache = cache
            teachers[cache] = HFTeacher(c, assets)
        tok = teachers[True].tokenizer
        probe = _batch(tok, cfg, 1, args.response, 0)[0]
        head, full = (
            len(teachers[True].prefix),
            len(teachers[True].prompts.teacher_ids(probe.prompt_token_ids)),
        )
        times: dict[bool, list[float]] = {True: [], False: []}
        cpu: dict[bool, list[float]] = {True: [], False: []}
        scores: dict[bool, list[np.ndarray]] = {}
        for r in range(args.repeats):
            for cache in (False, True):  # alternate, so machine load falls on both alike
                batch = _batch(tok, cfg, args.batch, args.response, r)
                t0, c0 = time.perf_counter(), time.process_time()
                teachers[cache].score(batch)
                times[cache].append(time.perf_counter() - t0)
                cpu[cache].append(
                    time.process_time() - c0
                )  # CPU seconds: steadier than wall time on a busy host
                scores[cache] = [t.teacher_logprobs for t in batch]
        diff = max(float(np.abs(a - b).max()) for a, b in zip(scores[True], scores[False], strict=True))
        on, off = statistics.median(times[True]), statistics.median(times[False])
        con, coff = statistics.median(cpu[True]), statistics.median(cpu[False])
        print(
            f"model {args.model}: cached prefix {head} tokens of a {full}-token teacher prompt (student prompt "
            f"{len(probe.prompt_token_ids)}), response {args.response}, batch {args.batch}, 1 thread\n"
            f"  per batch: {off:.3f}s without reuse, {on:.3f}s with reuse (x{off / on:.2f}; medians of "
            f"{args.repeats}; all {[round(x, 3) for x in times[False]]} vs {[round(x, 3) for x in times[True]]})\n"
            f"  CPU seconds per batch: {coff:.3f} without, {con:.3f} with (x{coff / con:.2f})\n"
            f"  max |logprob difference| {diff:.2e}"
        )


if __name__ == "__main__":
    main()
