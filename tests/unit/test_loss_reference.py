"""Every registered loss on the production path against a slow float64 reference written like the README.

The batch comes from `collate` over real `Trajectory` objects, the objective is the registered one, and the update
is `TorchEngine.step` around a tiny float64 Llama, micro-batched (3 sequences) as the learner runs it. The reference
recomputes each sequence alone (no padding), token by token, with the README's formulas: advantages over the whole
consumed batch, the correction per token, the aggregation over each optimiser step's rows. Loss values, the
gradient each optimiser step applies and the correction metrics must agree, for every loss x correction x
aggregation and the variants (gamma, whitening, sequence-level ratio, clip-higher, dual clip, a proximal policy
that moved because minibatches > 1, the teacher tail sent or estimated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from learner.batching import collate, split_minibatches
from learner.engines.torch import TorchEngine
from learner.losses import LOSSES
from opd.config import load_config
from opd.protocol import Trajectory
from tests.scored import VOCAB, tiny_model

D = torch.float64
FLOOR = -1e4  # a -inf teacher logprob
TAIL_FLOOR = 1e-6  # the least teacher tail mass assumed when the scorer sent none
K, N, TAU_S, TAU_T, MAX_NEW = 4, 8, 0.8, 1.5, 7
BASE = [
    f"learner.batch_size={N}",
    f"scorer.topk={K}",
    f"sampling.temperature={TAU_S}",
    f"scorer.temperature={TAU_T}",
    f"sampling.max_new_tokens={MAX_NEW}",
    "learner.micro_batch_size=3",
    "learner.warmup_steps=0",
    "learner.lr=0.05",
    "learner.grad_clip=1e9",  # the recorded gradient is the loss's own, not a clipped one
    "learner.correction.cap=1.2",
    "learner.correction.clip_eps=0.1",
]


# ------------------------------------------------------------------------------------------- the data
@pytest.fixture(scope="module")
def trajectories() -> list[Trajectory]:
    """Trajectories whose behaviour logprobs are the initial model's own (at TAU_S) plus noise, so ratios sit
    around 1 and every cap and clip both bites and lets tokens through; teacher at TAU_T with its tail, which the
    top-k cannot give on the confident first token (so where the tail came from shows in the loss)."""
    rng = np.random.default_rng(0)
    model = tiny_model(0, D)
    out = []
    for i in range(N):
        P, T = int(rng.integers(2, 5)), int(rng.integers(2, MAX_NEW + 1))
        ids = np.concatenate([[1], rng.integers(3, VOCAB, size=P + T - 1)]).astype(np.int32)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(ids[None], dtype=torch.long)).logits[0, P - 1 : P + T - 1]
        own = torch.log_softmax(logits / TAU_S, -1).gather(
            -1, torch.tensor(ids[P:], dtype=torch.long)[:, None]
        )
        b = np.minimum(own[:, 0].numpy() + rng.normal(scale=0.25, size=T), -1e-4)
        teacher_logits = torch.tensor(rng.normal(scale=2.0, size=(T, VOCAB)))
        teacher_logits[0, ids[P]] += (
            60.0  # confident on the first token: a tail of ~1e-17, below float32's reach
        )
        teacher = torch.log_softmax(teacher_logits / TAU_T, -1)
        top_lp, top_ids = teacher.topk(K, -1)
        tail = torch.logsumexp(teacher.scatter(-1, top_ids, -math.inf), -1)
        out.append(
            Trajectory(
                run_id="ref",
                prompt_id=f"p{i // 3}",
                group_id=f"g{i // 3}",  # groups of 3, 3 and 2
                sample_index=i % 3,
                prompt_token_ids=ids[:P],
                response_token_ids=ids[P:],
                behaviour_logprobs=b.astype(np.float32),
                policy_version=0,
                behaviour_temperature=TAU_S,
                teacher_logprobs=teacher[torch.arange(T), ids[P:]].numpy().astype(np.float32),
                teacher_topk_ids=top_ids.numpy().astype(np.int32),
                teacher_topk_logprobs=top_lp.numpy().astype(np.float32),
                teacher_tail_logprobs=tail.numpy().astype(np.float32),
                teacher_temperature=TAU_T,
                reward=float(rng.integers(0, 5)) / 4,
            )
        )
    return out


@dataclass
class Row:
    """One trajectory as the reference reads it: float64 of the wire values, as the learner gets them."""

    ids: torch.Tensor
    P: int
    T: int
    b: list[float]
    q: list[float]
    top_ids: list[list[int]]
    top_lp: list[list[float]]
    tail: list[float] | None
    reward: float
    group: str


def rows_of(trajs, with_tail=True) -> list[Row]:
    def f64(a):
        return np.asarray(a, dtype=np.float64).tolist()

    return [
        Row(
            torch.tensor(np.concatenate([t.prompt_token_ids, t.response_token_ids]), dtype=torch.long),
            len(t.prompt_token_ids),
            len(t.response_token_ids),
            f64(t.behaviour_logprobs),
            f64(t.teacher_logprobs),
            t.teacher_topk_ids.tolist(),
            f64(t.teacher_topk_logprobs),
            f64(t.teacher_tail_logprobs) if with_tail else None,
            t.reward,
            t.group_id,
        )
        for t in trajs
    ]


# --------------------------------------------------------------------------------------- the reference
def val(x) -> float:
    return float(x.detach()) if torch.is_tensor(x) else float(x)


def normalise(values: list[float], eps: float) -> list[float]:
    """(x - mean) / (population std + eps): the std divides by n, not n - 1."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / (std + eps) for v in values]


def task_advantages(rows: list[Row], estimator: str) -> list[float]:
    """GRPO: the reward normalised within its prompt's group (a group of one gets 0); REINFORCE++: over the batch."""
    if estimator == "reinforce_pp":
        return normalise([r.reward for r in rows], 1e-6)
    out = [0.0] * len(rows)
    for g in {r.group for r in rows}:
        idx = [i for i, r in enumerate(rows) if r.group == g]
        for i, a in zip(idx, normalise([rows[i].reward for i in idx], 1e-6), strict=True):
            out[i] = a
    return out


def distill_advantages(rows: list[Row], gamma: float, whitened: bool) -> list[list[float]]:
    """A_t = sum_{t' >= t} gamma^(t'-t) (q_t' - b_t'), then whitened over every token of the batch."""
    adv = [
        [sum(gamma ** (u - t) * (r.q[u] - r.b[u]) for u in range(t, r.T)) for t in range(r.T)] for r in rows
    ]
    if whitened:
        flat = normalise([a for row in adv for a in row], 1e-8)
        adv = [[flat.pop(0) for _ in row] for row in adv]
    return adv


def ratio(new, old, t: int, level: str):
    """exp(new_t - old_t); sequence level: exp(mean_u(new_u - old_u)) in value, gradient through new_t."""
    new = [torch.as_tensor(x, dtype=D) for x in new]
    if level == "token":
        return torch.exp(new[t] - torch.as_tensor(old[t], dtype=D))
    mean = sum(val(n) - val(o) for n, o in zip(new, old, strict=True)) / len(new)
    return math.exp(mean) * torch.exp(new[t] - new[t].detach())


def ppo(r, a: float, c) -> tuple[torch.Tensor, bool]:
    """max(-A r, -A clip(r, 1-eps, 1+eps_high)); with dual clip, a negative-advantage token at most c|A|."""
    high = c.clip_eps if c.clip_eps_high is None else c.clip_eps_high
    clipped_r = min(max(val(r), 1 - c.clip_eps), 1 + high)
    loss, was = (-a * clipped_r, True) if -a * clipped_r > val(-a * r) else (-a * r, False)
    if c.dual_clip is not None and a < 0 and val(loss) > c.dual_clip * abs(a):
        loss, was = c.dual_clip * abs(a), True
    return torch.as_tensor(loss, dtype=D) if not torch.is_tensor(loss) else loss, was


def pg_token(s, b, p, a: float, t: int, c) -> tuple:
    """(loss, weight, clipped, kept) of one token under the README's correction table."""
    if c.mode == "none":
        return -a * s[t], 1.0, False, True
    r = ratio(s, b, t, c.level)
    if c.mode == "tis":
        w = min(val(r), c.cap)
        return -w * a * s[t], w, val(r) > c.cap, True
    if c.mode == "mask":
        kept = 1 / c.cap <= val(r) <= c.cap
        return -a * s[t] * float(kept), 1.0, not kept, kept
    if c.mode == "ppo_clip":
        loss, was = ppo(r, a, c)
        return loss, val(r), was, True
    w_raw = val(
        ratio(p, b, t, c.level)
    )  # decoupled: behaviour -> proximal weight, clip on proximal -> current
    loss, was = ppo(ratio(s, p, t, c.level), a, c)
    return min(w_raw, c.cap) * loss, min(w_raw, c.cap), was or w_raw > c.cap, True


def kl(log_p: list, log_q: list):
    return sum(torch.exp(torch.as_tensor(x)) * (x - y) for x, y in zip(log_p, log_q, strict=True))


def divergence(kind: str, beta: float, logits_row, top_ids, top_lp, tail):
    """Over the teacher's k ids plus one tail bucket, student at the teacher's temperature."""
    logp = torch.log_softmax(logits_row / TAU_T, -1)
    ls = [logp[j] for j in top_ids]
    ls.append(torch.log(1 - sum(torch.exp(x) for x in ls)))
    lt = [max(x, FLOOR) for x in top_lp]
    lt.append(tail if tail is not None else math.log(max(1 - sum(math.exp(x) for x in lt), TAIL_FLOOR)))
    if kind == "topk_forward_kl" or (kind == "gkd_jsd" and beta == 0.0):
        return kl(lt, ls)
    if kind == "topk_reverse_kl" or (kind == "gkd_jsd" and beta == 1.0):
        return kl(ls, lt)
    mix = [torch.log(beta * math.exp(x) + (1 - beta) * torch.exp(y)) for x, y in zip(lt, ls, strict=True)]
    return beta * kl(lt, mix) + (1 - beta) * kl(ls, mix)


def divergence_token(div, s, b, t: int, c) -> tuple:
    """Divergence losses have no ratio to clip: tis weighs, mask drops; under ppo_clip/decoupled (hybrid) plain."""
    if c.mode == "tis":
        w = min(val(ratio(s, b, t, c.level)), c.cap)
        return div * w, w, w >= c.cap, True
    if c.mode == "mask":
        r = val(ratio(s, b, t, c.level))
        kept = 1 / c.cap <= r <= c.cap
        return div * float(kept), 1.0, not kept, kept
    return div, 1.0, False, True


def aggregate(per_row: list[list], mode: str, constant: float):
    """token_mean: sum / tokens; seq_mean_token_mean: mean of row means; seq_sum: sum / (rows x constant)."""
    total = sum(x for row in per_row for x in row)
    if mode == "token_mean":
        return total / sum(len(row) for row in per_row)
    if mode == "seq_mean_token_mean":
        return sum(sum(row) / len(row) for row in per_row) / len(per_row)
    return total / (len(per_row) * constant)


def forward(model, row: Row):
    """The logit rows predicting each response token, one sequence alone: (T, V)."""
    return model(input_ids=row.ids[None]).logits[0, row.P - 1 : row.P - 1 + row.T]


def token_logprobs(logits, row: Row):
    logp = torch.log_softmax(logits / TAU_S, -1)
    return [logp[t, row.ids[row.P + t]] for t in range(row.T)]


# -------------------------------------------------------------------------------------------- the step
def reference_step(cfg, rows: list[Row], snapshots: list[list[torch.Tensor]]):
    """(loss, flat gradient) per optimiser step at the parameters that step saw, the metric means, and how far
    the later steps' policy drifted from the proximal one (largest |s_t - p_t|)."""
    lc = cfg.learner
    c = lc.correction
    distill = lc.hybrid.distill if lc.loss == "hybrid" else lc.loss
    terms = (["rl"] if lc.loss == "hybrid" else []) + [distill]
    task = task_advantages(rows, lc.task_estimator) if lc.loss in ("opd_penalty", "hybrid") else None
    adv = distill_advantages(rows, lc.gamma, lc.whiten)
    if lc.loss == "opd_penalty":
        adv = [[task[i] - lc.opd_lambda * (r.b[t] - r.q[t]) for t in range(r.T)] for i, r in enumerate(rows)]
    model = tiny_model(0, D)
    params = list(model.parameters())
    with torch.no_grad():  # the proximal policy: the parameters at the start of the update
        _load(params, snapshots[0])
        proximal = [[val(x) for x in token_logprobs(forward(model, r), r)] for r in rows]
    steps, sums, drift = [], {}, 0.0
    for j, idx in enumerate(split_minibatches(len(rows), lc.minibatches)):
        _load(params, snapshots[j])
        per_term = {name: [] for name in terms}
        for i in idx:
            r = rows[i]
            logits = forward(model, r)
            s = token_logprobs(logits, r)
            if j:
                drift = max([drift, *(abs(val(x) - y) for x, y in zip(s, proximal[i], strict=True))])
            for name in terms:
                out = []
                for t in range(r.T):
                    if name == "rl":
                        tok = pg_token(s, r.b, proximal[i], task[i], t, c)
                    elif name in ("reverse_kl_pg", "opd_penalty"):
                        tok = pg_token(s, r.b, proximal[i], adv[i][t], t, c)
                    else:
                        tail = None if r.tail is None else r.tail[t]
                        div = divergence(name, lc.jsd_beta, logits[t], r.top_ids[t], r.top_lp[t], tail)
                        tok = divergence_token(div, s, r.b, t, c)
                    out.append(tok[0])
                    _add(sums, "rl" if name == "rl" else "distill", tok[1:])
                per_term[name].append(out)
        scales = {
            "rl": lc.hybrid.rl_weight,
            distill: lc.hybrid.distill_weight if lc.loss == "hybrid" else 1.0,
        }
        constant = lc.aggregation_constant or MAX_NEW
        loss = sum(scales[name] * aggregate(per_term[name], lc.aggregation, constant) for name in terms)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).reshape(-1)
                for p, g in zip(params, grads, strict=True)
            ]
        )
        steps.append((val(loss), flat))
    return steps, _means(sums, lc.loss == "hybrid"), drift


def _load(params, values) -> None:
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)


def _add(sums: dict, term: str, stats: tuple) -> None:
    weights, clipped, dropped = sums.setdefault(term, ([], [], []))
    weights.append(stats[0])
    clipped.append(float(stats[1]))
    dropped.append(float(not stats[2]))


def _means(sums: dict, hybrid: bool) -> dict[str, float]:
    """Token means; hybrid: per term under its prefix, and unprefixed the RL weight and any-term clip/drop."""
    out = {}
    for term, (w, c, d) in sums.items():
        prefix = f"{term}_" if hybrid else ""
        n = len(w)
        out.update({f"{prefix}importance_weight": sum(w) / n, f"{prefix}clip_fraction": sum(c) / n})
        out[f"{prefix}masked_fraction"] = sum(d) / n
    if hybrid:
        rl, dist = sums["rl"], sums["distill"]
        n = len(rl[0])
        out["importance_weight"] = sum(rl[0]) / n
        out["clip_fraction"] = sum(max(a, b) for a, b in zip(rl[1], dist[1], strict=True)) / n
        out["masked_fraction"] = sum(max(a, b) for a, b in zip(rl[2], dist[2], strict=True)) / n
    return out


# ------------------------------------------------------------------------------------------- the engine
def engine_step(cfg, trajs):
    """One learner step on a fresh tiny model; the gradient and parameters each optimiser step saw."""
    model = tiny_model(0, D)
    engine = TorchEngine(model, cfg)
    seen = []

    def hook(opt, args, kwargs):
        params = list(model.parameters())
        seen.append(([p.detach().clone() for p in params], torch.cat([p.grad.reshape(-1) for p in params])))

    engine.optimizer.register_step_pre_hook(hook)
    record = engine.step(collate(trajs, 0))
    return record, seen


def check(overrides: list[str], trajs, with_tail=True) -> tuple[dict, float]:
    """Engine and reference agree on the step's loss, each optimiser step's gradient and the metrics."""
    cfg = load_config(None, BASE + overrides)
    if not with_tail:  # as a remote teacher's scorer sends them
        trajs = [replace(t, teacher_tail_logprobs=None) for t in trajs]
    record, seen = engine_step(cfg, trajs)
    steps, metrics, drift = reference_step(cfg, rows_of(trajs, with_tail), [p for p, _ in seen])
    assert len(seen) == len(steps) == cfg.learner.minibatches and record["skipped_steps"] == 0
    # The learner computes advantages from the wire's float32 values in float32 (the reference in float64): their
    # ~1e-7 relative rounding survives the cancellation of mean-zero advantages only to about 1e-7 absolute.
    assert record["loss"] == pytest.approx(sum(v for v, _ in steps) / len(steps), rel=1e-6, abs=1e-7)
    for (_, got), (_, want) in zip(seen, steps, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    for key, want in metrics.items():
        assert record[key] == pytest.approx(want, rel=1e-6, abs=1e-9), key
    return record, drift


# ---------------------------------------------------------------------------------------- the matrix
PG_MODES = ("none", "tis", "ppo_clip", "decoupled", "mask")
DIV_MODES = ("none", "tis", "mask")  # ppo_clip/decoupled clip a policy-gradient ratio the divergences lack
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_sum")
MATRIX_LOSSES = {
    "reverse_kl_pg": ["learner.loss=reverse_kl_pg"],
    "opd_penalty": ["learner.loss=opd_penalty", "learner.opd_lambda=0.7"],
    "topk_forward_kl": ["learner.loss=topk_forward_kl"],
    "topk_reverse_kl": ["learner.loss=topk_reverse_kl"],
    "gkd_jsd": ["learner.loss=gkd_jsd", "learner.jsd_beta=0.3"],
    "hybrid": [
        "learner.loss=hybrid",
        "learner.hybrid.distill=topk_reverse_kl",
        "learner.hybrid.rl_weight=0.7",
        "learner.hybrid.distill_weight=1.3",
    ],
}
MATRIX = [
    (name, mode, agg)
    for name in MATRIX_LOSSES
    for mode in (DIV_MODES if LOSSES[name].needs_topk else PG_MODES)
    for agg in AGGREGATIONS
]


def test_the_matrix_covers_every_registered_loss():
    assert set(MATRIX_LOSSES) == set(LOSSES)


@pytest.mark.parametrize("name, mode, agg", MATRIX)
def test_every_loss_correction_and_aggregation(trajectories, name, mode, agg):
    over = [*MATRIX_LOSSES[name], f"learner.correction.mode={mode}", f"learner.aggregation={agg}"]
    check(over, trajectories)


PPO = ["learner.correction.mode=ppo_clip"]
DEC = ["learner.correction.mode=decoupled"]
SEQ = ["learner.correction.level=sequence"]
VARIANTS = {
    "gamma": ["learner.gamma=0.9"],
    "whiten": ["learner.whiten=true"],
    "gamma-whiten-ppo": ["learner.gamma=0.5", "learner.whiten=true", *PPO],
    "sequence-tis": SEQ,
    "sequence-mask": [*SEQ, "learner.correction.mode=mask"],
    "sequence-ppo": [*SEQ, *PPO],
    "sequence-decoupled": [*SEQ, *DEC],
    "sequence-tis-topk": [*SEQ, "learner.loss=topk_forward_kl"],
    "clip-higher": [*PPO, "learner.correction.clip_eps_high=0.3"],
    "dual-clip": [*PPO, "learner.correction.dual_clip=1.1"],
    "ppo-minibatches": [*PPO, "learner.minibatches=2"],
    "decoupled-moved": [*DEC, "learner.minibatches=2"],
    "decoupled-moved-all": [
        *DEC,
        *SEQ,
        "learner.minibatches=3",
        "learner.correction.clip_eps_high=0.3",
        "learner.correction.dual_clip=1.1",
    ],
    "reinforce-pp": ["learner.loss=opd_penalty", "learner.task_estimator=reinforce_pp"],
    "hybrid-pg-ppo": ["learner.loss=hybrid", *PPO],
    "hybrid-jsd-tis": ["learner.loss=hybrid", "learner.hybrid.distill=gkd_jsd"],
    "hybrid-fkl-mask": [
        "learner.loss=hybrid",
        "learner.hybrid.distill=topk_forward_kl",
        "learner.correction.mode=mask",
    ],
    "hybrid-decoupled-moved": [
        "learner.loss=hybrid",
        "learner.hybrid.distill=topk_forward_kl",
        *DEC,
        "learner.minibatches=2",
    ],
    "jsd-beta-0": ["learner.loss=gkd_jsd", "learner.jsd_beta=0"],
    "jsd-beta-1": ["learner.loss=gkd_jsd", "learner.jsd_beta=1"],
    "seq-sum-constant": ["learner.aggregation=seq_sum", "learner.aggregation_constant=5"],
}


@pytest.mark.parametrize("name", VARIANTS)
def test_variants(trajectories, name):
    _, drift = check(VARIANTS[name], trajectories)
    if "minibatches" in name or "moved" in name:  # later steps saw a policy that left the clip range
        assert drift > math.log(1.1)


@pytest.mark.parametrize("name", ["topk_forward_kl", "topk_reverse_kl", "gkd_jsd"])
def test_topk_losses_without_the_scorers_tail(trajectories, name):
    """A remote teacher sends no tail: the loss takes 1 - sum(top-k), at least TAIL_FLOOR, as the tail mass."""
    check(MATRIX_LOSSES[name], trajectories, with_tail=False)
