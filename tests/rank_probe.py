"""One learner rank's rendezvous, as a scheduler or torchrun starts it, without the rest of the learner.

`python tests/rank_probe.py CONFIG [overrides]` reads the rank from the environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, LOCAL_RANK: torchrun's and Slurm scripts' names), joins the learner group through the
production code (learner.ranks.rendezvous, RankGroup.join), receives rank 0's bytes, gathers every rank's, and
prints one JSON line (and writes it to $OPD_PROBE_OUT/rank-N.json when that is set). tests/e2e/test_compose_ranks.py
runs it under torchrun with the docker-compose learner service's flags.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's packages

from learner.ranks import RankGroup, rendezvous  # noqa: E402
from opd.config import load_config  # noqa: E402


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    rv = rendezvous(cfg.learner, None)
    group = RankGroup.join(rv, "cpu", cfg.learner.collective_timeout_s)
    try:
        got = group.broadcast_bytes(b"from rank 0" if group.leader else None).decode()
        ranks = group.all_gather_obj(group.rank)
        line = {"rank": rv.rank, "world": rv.world, "local_rank": rv.local_rank, "addr": rv.addr,
                "port": rv.port, "got": got, "ranks": ranks, "agent_store": os.environ.get("TORCHELASTIC_USE_AGENT_STORE")}  # fmt: skip
        print(json.dumps(line), flush=True)
        out_dir = os.environ.get("OPD_PROBE_OUT")
        if out_dir:  # ranks that share one stdout (torchrun's) can interleave their lines there
            (Path(out_dir) / f"rank-{rv.rank}.json").write_text(json.dumps(line))
    finally:
        group.close()


if __name__ == "__main__":
    main()
