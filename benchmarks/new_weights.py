"""What `actor.on_new_weights` costs and buys, measured on the real slot sampler (opd/models/slots.py) with real
consecutive weight versions: the default is chosen from this.

    python benchmarks/new_weights.py            # about a minute on a 2-core CPU
    python benchmarks/new_weights.py --smoke    # seconds: checks the script, measures little

Versions: the benchmark harness (benchmarks/harness.py: the actor's sampler, the HF teacher, the learner's engine
step) trains the tiny demo student of configs/tiny.yaml for `--warm` steps, then keeps the weights before and
after each of the next `--updates` learner steps: real one-step updates at the demo's lr (with Adam, each moves
every weight by about lr). For each update, `--inflight` sequences of the addition task's prompts decode with the
old weights for `--before` steps, the new weights land, and they decode `--after` more steps (EOS is not a stop,
so every sequence crosses the update with the same number of tokens on each side):

- continue: the KV cache of the tokens before the update is kept (computed by the old weights). Reported: the
  gap between each later token's behaviour logprob and the logprob the new version alone gives the same token
  after the same prefix (opd.models.sampler.response_logprobs), mean and max |difference| in nats, and the mean
  importance-weight error exp(|gap|) - 1; the same gap for recompute, which should be float noise;
- recompute: one prefill of every sequence in flight with the new weights. Reported: its seconds, against a
  decode step's.

Writes JSON to --out (default benchmarks/results/new_weights.json). Pin threads: the script sets one torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Harness, clone_state  # noqa: E402
from opd import tasks  # noqa: E402
from opd.config import load_config  # noqa: E402
from opd.models.builds import ensure_assets, load_asset  # noqa: E402
from opd.models.prompts import prompt_ids  # noqa: E402
from opd.models.sampler import response_logprobs  # noqa: E402
from opd.models.slots import SlotSampler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"
RESULTS = REPO / "benchmarks" / "results"


def crossing(model, old, new, prompts, before: int, after: int, mode: str, pad_id: int) -> dict:
    """Decode `before` steps with `old`, load `new`, decode `after` more: each sequence's behaviour logprobs after
    the update, and the seconds of the update's handling and of the decode steps."""
    model.load_state_dict(old)
    slots = SlotSampler(model, eos_ids=[-1], pad_id=pad_id, max_new_tokens=before + after, temperature=1.0)
    for i, p in enumerate(prompts):
        slots.start(str(i), p, seed=1000 + i)
    step_s, out = [], {}
    for _ in range(before):
        t0 = time.perf_counter()
        slots.step(0)
        step_s.append(time.perf_counter() - t0)
    model.load_state_dict(new)
    t0 = time.perf_counter()
    if mode == "recompute":
        slots.recompute()
    update_s = time.perf_counter() - t0
    for _ in range(after):
        t0 = time.perf_counter()
        out.update(slots.step(1))
        step_s.append(time.perf_counter() - t0)
    return {"samples": out, "update_s": update_s, "step_s": statistics.median(step_s)}


def version_gaps(model, prompts, samples: dict, before: int, pad_id: int) -> list[float]:
    """|behaviour logprob - the logprob `model` (the new version) gives the same token after the same prefix|, for
    every token sampled after the update: 0 where the recorded behaviour logprob is exactly the new version's."""
    keys = sorted(samples, key=int)
    seqs = [(prompts[int(k)], samples[k].response_ids) for k in keys]
    exact, _, _ = response_logprobs(model, seqs, pad_id=pad_id)
    return [
        abs(b - float(e))
        for k, lp in zip(keys, exact, strict=True)
        for b, e in zip(samples[k].behaviour_logprobs[before:], lp[before:], strict=True)
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm", type=int, default=20, help="learner steps before the measured updates")
    ap.add_argument("--updates", type=int, default=5, help="consecutive real updates measured")
    ap.add_argument("--inflight", type=int, default=32, help="sequences in flight at each update")
    ap.add_argument("--before", type=int, default=16, help="decode steps before the update")
    ap.add_argument("--after", type=int, default=16, help="decode steps after it")
    ap.add_argument("--smoke", action="store_true", help="2 warm steps, 1 update, 8 sequences, 4+4 steps")
    ap.add_argument("--out", type=Path, default=RESULTS / "new_weights.json")
    args = ap.parse_args()
    if args.smoke:
        args.warm, args.updates, args.inflight, args.before, args.after = 2, 1, 8, 4, 4
    torch.set_num_threads(1)
    cfg = load_config(CONFIG)
    assets = ensure_assets(cfg, log=lambda *_: None)
    harness = Harness(cfg, assets, seed=0)
    for _ in range(args.warm):
        harness.step()
    model, tok = load_asset(assets.student)
    model.eval()
    problems = tasks.training_stream(cfg.task, seed=123)
    prompts = [prompt_ids(tok, next(problems)) for _ in range(args.inflight)]
    rows = []
    for _ in range(args.updates):
        old = clone_state(harness.model)
        harness.step()
        new = clone_state(harness.model)
        moved = max((new[k].float() - old[k].float()).abs().max().item() for k in old)
        cont = crossing(model, old, new, prompts, args.before, args.after, "continue", tok.pad_token_id)
        exact = crossing(model, old, new, prompts, args.before, args.after, "recompute", tok.pad_token_id)
        model.load_state_dict(new)  # each token after the update, scored by the new version alone
        cont_gaps = version_gaps(model, prompts, cont["samples"], args.before, tok.pad_token_id)
        exact_gaps = version_gaps(model, prompts, exact["samples"], args.before, tok.pad_token_id)
        rows.append(
            {
                "max_weight_change": moved,
                "gap_mean_nats": statistics.fmean(cont_gaps),
                "gap_max_nats": max(cont_gaps),
                "ratio_error_mean": statistics.fmean(torch.tensor(cont_gaps).exp().sub(1).tolist()),
                "recompute_gap_max_nats": max(exact_gaps),  # recompute is exact: float noise only
                "recompute_s": exact["update_s"],
                "decode_step_s": exact["step_s"],
                "recompute_in_decode_steps": exact["update_s"] / exact["step_s"],
            }
        )
        print(json.dumps(rows[-1]))
    result = {
        "config": str(CONFIG.relative_to(REPO)),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "updates": rows,
        "gap_mean_nats": statistics.fmean(r["gap_mean_nats"] for r in rows),
        "gap_max_nats": max(r["gap_max_nats"] for r in rows),
        "recompute_in_decode_steps": statistics.fmean(r["recompute_in_decode_steps"] for r in rows),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "load_1min": os.getloadavg()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"continue: behaviour logprob gap mean {result['gap_mean_nats']:.2e} nats, max {result['gap_max_nats']:.2e}; "
        f"recompute: {result['recompute_in_decode_steps']:.1f} decode steps per update "
        f"(load {result['load_1min']:.1f}); written to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
