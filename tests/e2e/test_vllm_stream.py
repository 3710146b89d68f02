"""The vLLM student engine's streaming mode (actor.generation: stream) against the Hugging Face reference.

Run in the vLLM tier (`.venv-vllm/bin/python -m pytest -m vllm`); skipped without vllm. The sequences are random
ids (the trained student would answer the addition prompts in three tokens), so they run long enough to cross
weight updates. Tolerance ATOL as in test_vllm.py: float32 rounding of different kernels, two orders below what a
stale weight or a wrong version stamp moves a logprob.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from opd.config import load_config
from opd.models.builds import ensure_assets
from opd.models.sampler import response_logprobs
from tests.conftest import TINY

pytest.importorskip("vllm", reason="vllm not installed: run scripts/setup_vllm_env.sh and use .venv-vllm")
pytestmark = pytest.mark.vllm

ATOL = 1e-4
BLOCK = 32  # vLLM's KV block: a prompt caches a prefix block only once it fills one
UPDATES = (2, 4)  # steps before which a new weight version lands (versions 1, 2, ... in this order)


@pytest.fixture(scope="module")
def engine(prepared):
    from actors.engines.vllm import VLLMEngine

    cfg = load_config(TINY, [f"run.cache_dir={prepared}", "actor.engine=vllm", "actor.generation=stream"])
    cfg.actor.vllm.engine_kwargs = {
        "block_size": BLOCK
    }  # CPU default 128: longer than the tiny model's context
    eng = VLLMEngine(cfg, ensure_assets(cfg))
    yield eng
    eng.close()


def _request(key: str, prompt: list[int], seed: int):
    from actors.engines.request import Request

    return Request(key=key, prompt_ids=prompt, images=None, seed=seed)


def _random_prompts(tok, count: int, seed: int, length: int = 11) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[tok.bos_token_id, *rng.integers(3, len(tok), size=length - 1).tolist()] for _ in range(count)]


def _new_weights(engine, seed: int) -> torch.nn.Module:
    """Move the receive buffer's weights as a broadcast would; returns an HF copy holding them."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in engine.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return copy.deepcopy(engine.model)


def _drain(engine, held: list[int], updates: dict[int, int], snapshots: dict) -> dict:
    """Step until nothing is in flight, landing `updates` (step -> version) between steps; `held[s]` is the
    version the engine held during step s. Returns {key: (sample, the step it finished in)}."""
    done = {}
    while engine.inflight():
        step = len(held)
        if step in updates:
            snapshots[updates[step]] = _new_weights(engine, seed=step)
            engine.sync_weights(updates[step])
        held.append(engine.version)
        for key, smp in engine.step():
            assert key not in done, "a sequence was returned twice"
            done[key] = (smp, step)
    return done


@pytest.mark.parametrize("mode", ["recompute", "restart", "continue"])
def test_sequences_crossing_weight_updates(engine, mode):
    """Each token carries the version the engine held at the step that sampled it. recompute and restart: its
    behaviour logprob is the recomputation of the whole sequence by that version's weights (recompute re-prefills
    with the new weights, restart starts over). continue keeps KV from older weights, so its post-update
    logprobs match neither version: the mode really continues."""
    engine.cfg.actor.on_new_weights = mode
    engine.cfg.sampling.max_new_tokens = 10
    engine.cfg.sampling.temperature = 0.7
    tok = engine.tokenizer
    prompts = _random_prompts(tok, 8, seed=1)
    base = engine.version
    snapshots = {base: copy.deepcopy(engine.model)}
    for i, p in enumerate(prompts):
        engine.start(_request(str(i), p, seed=100 + i))
    assert engine.inflight() == len(prompts)
    held: list[int] = []
    updates = {step: base + k + 1 for k, step in enumerate(UPDATES)}
    done = _drain(engine, held, updates, snapshots)
    assert sorted(done) == [str(i) for i in range(len(prompts))]

    crossed, continued_gap = 0, 0.0
    for key, (smp, last) in done.items():
        n = len(smp.response_ids)
        assert 1 <= n <= 10 and len(smp.behaviour_logprobs) == n == len(smp.token_versions)
        assert smp.token_versions == sorted(smp.token_versions)
        # one token per step from the step the sequence (re)started in: step 0, or with restart the last update
        # it was in flight for
        first = max((s for s in UPDATES if s <= last), default=0) if mode == "restart" else 0
        assert last - n + 1 == first
        assert smp.token_versions == held[first : first + n]
        crossed += len(set(smp.token_versions)) > 1
        prompt = prompts[int(key)]
        got = np.asarray(smp.behaviour_logprobs)
        versions = np.asarray(smp.token_versions)
        for v in set(smp.token_versions):
            (ref,), _, _ = response_logprobs(
                snapshots[v], [(prompt, smp.response_ids)], pad_id=tok.pad_token_id, temperature=0.7
            )
            at_v = versions == v
            if mode == "continue" and v != versions[0]:
                continued_gap = max(continued_gap, float(np.abs(got[at_v] - ref.numpy()[at_v]).max()))
            else:
                np.testing.assert_allclose(got[at_v], ref.numpy()[at_v], atol=ATOL, rtol=0)
                if v != base:  # the update mattered: the previous weights score these tokens differently
                    (old,), _, _ = response_logprobs(
                        snapshots[v - 1],
                        [(prompt, smp.response_ids)],
                        pad_id=tok.pad_token_id,
                        temperature=0.7,
                    )
                    assert float(np.abs(got[at_v] - old.numpy()[at_v]).max()) > 1e-2
    if mode == "restart":
        assert crossed == 0  # a restarted sequence keeps nothing of the versions before
    else:
        assert crossed >= 1, "no sequence crossed an update: the test would not see a wrong version"
    if mode == "continue":
        assert continued_gap > 1e-3, "tokens after an update match the recomputation: KV was not kept"


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, bins with an expected count under 5 merged into one."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def _p_value(stat: float, dof: int) -> float:
    # chi-square survival function: the regularised upper incomplete gamma Q(dof/2, stat/2)
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))


def test_stream_samples_the_batch_distribution(engine):
    """No weight change: the first tokens of many streamed sequences and of a batch `sample` both follow the
    model's exact next-token distribution (chi-square goodness of fit), and their behaviour logprobs are its
    log-probabilities. Seeds are fixed, so the test is deterministic."""
    engine.cfg.sampling.max_new_tokens = 1
    engine.cfg.sampling.temperature = 1.0
    tok = engine.tokenizer
    (prompt,) = _random_prompts(tok, 1, seed=2)
    count = 400
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([prompt])).logits[0, -1, : engine.vocab]
    logp = torch.log_softmax(logits.float(), -1).numpy()
    probs = np.exp(logp)

    for i in range(count):
        engine.start(_request(f"s{i}", prompt, seed=10_000 + i))
    streamed = {}
    while engine.inflight():
        streamed.update(engine.step())
    batch = engine.sample([prompt] * count, torch.Generator().manual_seed(0))
    for samples in (list(streamed.values()), batch):
        assert len(samples) == count
        first = np.array([s.response_ids[0] for s in samples])  # the last pass leaves the batch's
        np.testing.assert_allclose([s.behaviour_logprobs[0] for s in samples], logp[first], atol=ATOL, rtol=0)
        stat, dof = _chi_square(np.bincount(first, minlength=engine.vocab), probs)
        assert dof >= 2, "the distribution is too peaked for this test to see anything"
        assert _p_value(stat, dof) > 1e-3, (stat, dof)
    # and a clearly different distribution is rejected at this sample size (the test has power)
    tempered = np.exp(np.log(probs) / 0.5)
    stat, dof = _chi_square(np.bincount(first, minlength=engine.vocab), tempered / tempered.sum())
    assert _p_value(stat, dof) < 1e-3


def test_abort_drops_everything_in_flight(engine):
    engine.cfg.sampling.max_new_tokens = 10
    engine.cfg.sampling.temperature = 1.0
    prompts = _random_prompts(engine.tokenizer, 6, seed=3)
    for i, p in enumerate(prompts):
        engine.start(_request(str(i), p, seed=i))
    finished = [key for _ in range(2) for key, _ in engine.step()]
    left = engine.inflight()
    assert left == len(prompts) - len(finished) > 0
    assert engine.abort() == left
    assert engine.inflight() == 0 and engine.llm.llm_engine.get_num_unfinished_requests() == 0
    assert engine.step() == []
    # the keys are free again, and nothing of the dropped sequences comes back
    for i, p in enumerate(prompts):
        engine.start(_request(str(i), p, seed=i))
    done = {}
    while engine.inflight():
        for key, smp in engine.step():
            assert key not in done
            done[key] = smp
    assert sorted(done) == [str(i) for i in range(len(prompts))]


def _run(engine, key: str, prompt: list[int], seed: int):
    engine.start(_request(key, prompt, seed))
    while True:
        for k, smp in engine.step():
            if k == key:
                return smp


@pytest.mark.parametrize("keep", [False, True])
def test_continue_update_keeps_new_sequences_off_stale_prefix_blocks(engine, keep):
    """on_new_weights: continue lands an update while sequences run, when vLLM cannot reset its prefix cache.
    A sequence started after it on a prompt whose prefix block the old weights cached must not read that block
    (actor.keep_kv_cache: false): its logprobs are the new weights'. With keep_kv_cache it reads it, which shows
    the block really was there to be read."""
    engine.cfg.actor.on_new_weights = "continue"
    engine.cfg.actor.keep_kv_cache = keep
    engine.cfg.sampling.max_new_tokens = 10
    engine.cfg.sampling.temperature = 1.0
    tok = engine.tokenizer
    (cached,) = _random_prompts(tok, 1, seed=4, length=BLOCK + 8)
    try:
        _run(engine, "warm", cached, seed=0)  # its first block is now cached, computed by the current weights
        for i, p in enumerate(_random_prompts(tok, 4, seed=5)):
            engine.start(_request(f"run{i}", p, seed=i))
        engine.step()
        _new_weights(engine, seed=7)
        engine.sync_weights(engine.version + 1)
        assert engine.inflight() > 0, "nothing in flight at the update: vLLM would simply reset its cache"
        smp = _run(engine, "after", cached, seed=1)
        (ref,), _, _ = response_logprobs(engine.model, [(cached, smp.response_ids)], pad_id=tok.pad_token_id)
        gap = float(np.abs(np.asarray(smp.behaviour_logprobs) - ref.numpy()).max())
        if keep:
            assert gap > 1e-3, "the prefix block was not reused: this test would not see a stale read"
        else:
            assert gap < ATOL
    finally:
        engine.abort()
        engine.cfg.actor.keep_kv_cache = False
