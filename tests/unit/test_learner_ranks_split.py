"""The learner ranks' pure parts: the token-balanced split of a global batch, the rendezvous rules, the refusal of
a checkpoint sharded over another number of ranks, and the settings a learner of several ranks refuses."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from learner.ranks import balance_by_tokens, rendezvous
from learner.state import RunFiles
from opd.config import ConfigError, load_config

IMBALANCE = 1.10  # the heaviest rank carries at most 10% more than the mean on the uneven batches below


def _loads(tokens: list[int], shares: list[list[int]]) -> list[int]:
    return [sum(tokens[i] for i in s) for s in shares]


def test_split_balances_tokens_not_rows():
    """A batch of very uneven lengths: one 900-token row and many short ones. Split by count, one rank would
    carry most of the tokens; split by tokens, the long row's rank gets few others."""
    tokens = [900, *[30] * 30, 5, 5, 7]
    shares = balance_by_tokens(tokens, 2)
    loads = _loads(tokens, shares)
    assert sorted(i for s in shares for i in s) == list(range(len(tokens)))  # every row once
    assert max(loads) / (sum(loads) / 2) <= IMBALANCE
    assert len(shares[0]) != len(shares[1])  # rows are not split evenly, tokens are
    by_count = _loads(tokens, [list(range(0, 17)), list(range(17, len(tokens)))])
    assert max(by_count) / (sum(by_count) / 2) > 1.4  # what a split by count would have done


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_split_stays_within_its_bound_and_is_deterministic(ranks):
    rng = random.Random(ranks)
    for _ in range(200):
        tokens = [rng.choice([rng.randint(1, 20), rng.randint(100, 2000)]) for _ in range(rng.randint(1, 64))]
        shares = balance_by_tokens(tokens, ranks)
        assert shares == balance_by_tokens(list(tokens), ranks)  # the same answer on every rank
        assert sorted(i for s in shares for i in s) == list(range(len(tokens)))
        assert all(s == sorted(s) for s in shares)
        loads = _loads(tokens, shares)
        assert max(loads) <= sum(tokens) / ranks + max(tokens)  # greedy longest-first: within one row of even
        if len(tokens) >= 8 * ranks and max(tokens) <= 20:  # many rows of similar size: nearly even
            assert max(loads) / (sum(loads) / ranks) <= IMBALANCE
        if len(tokens) >= ranks:
            assert all(shares)  # every rank gets a row when there are enough


def test_split_with_fewer_rows_than_ranks_leaves_ranks_empty():
    assert balance_by_tokens([5], 3) == [[0], [], []]
    assert balance_by_tokens([3, 9], 2) == [[1], [0]]  # longest first onto rank 0
    with pytest.raises(ValueError, match="ranks"):
        balance_by_tokens([1], 0)


def _learner(*overrides):
    return load_config(None, list(overrides)).learner


def test_rendezvous_from_the_config_or_the_environment():
    one = rendezvous(_learner(), None, {"RANK": "3", "WORLD_SIZE": "1"})
    assert (one.rank, one.world) == (0, 1)  # one rank ignores a scheduler's RANK
    lc = _learner("learner.num_ranks=2", "learner.master_port=29555")
    rv = rendezvous(lc, 1, {})
    assert (rv.addr, rv.port, rv.rank, rv.world, rv.local_rank) == ("127.0.0.1", 29555, 1, 2, 1)
    env = {
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "1234",
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
    }
    rv = rendezvous(_learner("learner.num_ranks=2"), None, env)
    assert (rv.addr, rv.port, rv.rank, rv.local_rank) == ("10.0.0.7", 1234, 1, 0)
    rv = rendezvous(
        _learner("learner.num_ranks=2", "learner.master_addr=h0", "learner.master_port=9"), None, env
    )
    assert (rv.addr, rv.port) == ("h0", 9)  # the config wins where it is set


def test_rendezvous_refuses_what_cannot_meet():
    with pytest.raises(ValueError, match=r"WORLD_SIZE=4 but learner.num_ranks is 2; set learner.num_ranks=4"):
        rendezvous(_learner("learner.num_ranks=2"), None, {"WORLD_SIZE": "4", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="needs a rendezvous port"):
        rendezvous(_learner("learner.num_ranks=2"), 0, {})
    with pytest.raises(ValueError, match="rank 2 is outside learner.num_ranks=2"):
        rendezvous(_learner("learner.num_ranks=2", "learner.master_port=5"), 2, {})


def test_zero3_ranks_refuse_inline_evaluation():
    over = ["learner.num_ranks=2", "learner.engine=deepspeed", "learner.deepspeed.zero_stage=3"]
    with pytest.raises(ConfigError, match="eval_mode: background"):
        load_config(None, over)
    assert load_config(None, [*over, "learner.eval_mode=background"]).learner.num_ranks == 2
    assert load_config(None, [*over, "learner.eval_every=0"]).learner.num_ranks == 2


def test_a_checkpoint_of_another_number_of_ranks_is_refused_when_sharded_and_not_reshardable(tmp_path):
    """The engines' own classes say whether their state is sharded per rank and whether it can be resharded (read
    before any is built): DeepSpeed's ZeRO shards go through its universal checkpoint
    (tests/e2e/test_learner_reshard.py); an engine whose shards cannot be converted is refused."""
    from learner.engines.base import Engine
    from learner.engines.deepspeed import DeepSpeedEngine
    from learner.engines.torch import TorchEngine

    class ShardedOnly(Engine):  # the contract's third case: per-rank state, no conversion
        per_rank_state = True

    checkpoint = tmp_path / "checkpoints" / "step-000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text(json.dumps({"step": 4, "num_ranks": 2}))
    files = RunFiles(tmp_path, _learner("learner.num_ranks=3", "learner.master_port=5"))
    files.check_ranks(checkpoint, TorchEngine)  # a replicated state fits any number of ranks
    files.check_ranks(checkpoint, DeepSpeedEngine)  # converted by rank 0 first (RunFiles.reshard)
    with pytest.raises(
        RuntimeError, match=r"written by 2 learner rank\(s\), but learner.num_ranks is 3.*num_ranks=2"
    ):
        files.reshard(checkpoint, ShardedOnly)
    RunFiles(tmp_path, _learner("learner.num_ranks=2", "learner.master_port=5")).check_ranks(
        checkpoint, ShardedOnly
    )


def test_opd_learner_refuses_a_rank_outside_the_group(capsys):
    """`opd learner --rank` is checked against learner.num_ranks before anything starts (exit 2, the fix named)."""
    from opd.launch.cli import main

    tiny = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    by_hand = [
        "run.run_id=x",
        "broker.port=5",
        "weight_sync.port=6",
        "learner.num_ranks=2",
        "learner.master_port=7",
    ]
    assert main(["learner", "--config", tiny, "--rank", "2", *by_hand]) == 2
    assert "learner rank 2 is outside learner.num_ranks=2" in capsys.readouterr().err
