"""Named teachers' scorers get metrics ports of their own (a block per pool, after the actors), where their names
`scorer-<teacher>-<i>` used to crash the port formula; the default pool keeps its old ports."""

from __future__ import annotations

from opd.config import load_config
from opd.runtime.prometheus import metrics_port, port_map

TWO = [
    "teachers={adder: {}, speller: {scorer: {num_scorers: 2}}}",
    "routing.default=adder",
    "metrics.port=9400",
    "actor.num_actors=2",
]


def test_each_pool_has_ports_of_its_own_and_none_collide():
    cfg = load_config(None, TWO)
    ports = port_map(cfg)
    assert list(ports) == [
        "learner",
        "actor-0",
        "actor-1",
        "scorer-adder-0",
        "scorer-speller-0",
        "scorer-speller-1",
    ]
    assert len(set(ports.values())) == len(ports)
    assert ports["scorer-adder-0"] == 9403 and ports["scorer-speller-1"] == 9504
    assert metrics_port(cfg, "scorer-speller-7") == 9510  # a scaled-up scorer stays inside its pool's block


def test_the_default_pool_keeps_its_ports():
    cfg = load_config(None, ["metrics.port=9400", "actor.num_actors=2", "scorer.num_scorers=2"])
    assert port_map(cfg) == {
        "learner": 9400,
        "actor-0": 9401,
        "actor-1": 9402,
        "scorer-0": 9403,
        "scorer-1": 9404,
    }
