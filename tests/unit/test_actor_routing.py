"""The actor's side of several teachers (actors/routing.py, what Actor.generate_batch and Actor.publish call): the
metadata a trajectory carries for its route, the route chosen from it and stamped normalised, and the streams its
copies go to; the scorer's side of the same contract (teacher_scorers/scorer.py): its component name, which
rollouts it refuses, and `--teacher` naming no teacher of the run. A run without a teachers section keeps its
messages and its one `rollouts` stream."""

from __future__ import annotations

import dataclasses
import math

import msgpack
import numpy as np
import pytest

from actors.routing import Copy, Router
from opd import tasks
from opd.config import load_config
from opd.protocol import Trajectory, decode, encode
from teacher_scorers.scorer import component_name, main, route_problem

TWO = [
    "run.run_id=rt",
    "teachers={adder: {}, speller: {}}",
    "routing.routes={addition: {adder: 1}, capitals: {speller: 3}, both: {adder: 1, speller: 3}}",
    "routing.default={adder: 0, speller: 2}",
]
PROBLEM = tasks.Problem(prompt_id="p1", prompt="12+3=", answer="15")


def _traj(router: Router, problem: tasks.Problem) -> Trajectory:
    """A trajectory as Actor.generate_batch builds it: the router's metadata, then the route stamped."""
    t = Trajectory(
        run_id="rt", prompt_id=problem.prompt_id, group_id="g", sample_index=0,
        prompt_token_ids=np.array([1, 2], np.int32), response_token_ids=np.array([3], np.int32),
        behaviour_logprobs=np.array([-1.0], np.float32), policy_version=0, task=router.metadata(problem),
    )  # fmt: skip
    router.stamp(t)
    return t


def test_without_teachers_the_message_and_stream_are_as_before():
    router = Router(load_config(None, ["run.run_id=rt"]))
    t = _traj(router, PROBLEM)
    assert t.task == {"answer": "15"} and t.teacher_weights is None
    raw = msgpack.unpackb(encode(t), raw=False)
    assert "teacher_weights" not in raw and "teacher_name" not in raw
    by_stream, where = router.copies([t])
    assert by_stream == {"rt:rollouts": [0]} and where == [[Copy("rt:rollouts", 0)]]


def test_the_route_follows_the_prompts_task_and_is_stamped_normalised():
    router = Router(load_config(None, TWO))
    added = _traj(router, PROBLEM)  # the built-in task's name reaches the route
    assert added.task == {"answer": "15", "task": "addition"}
    assert added.teacher_weights == {"adder": 1.0}
    # a problem that names its own task (a mixed task's, or a JSONL field) wins over the run's task kind
    capital = _traj(router, dataclasses.replace(PROBLEM, metadata={"task": "capitals"}))
    assert capital.task["task"] == "capitals" and capital.teacher_weights == {"speller": 1.0}
    mixed = _traj(router, dataclasses.replace(PROBLEM, metadata={"task": "both"}))
    assert mixed.teacher_weights == {"adder": 0.25, "speller": 0.75}
    other = _traj(router, dataclasses.replace(PROBLEM, metadata={"task": "spelling"}))
    assert other.teacher_weights == {"speller": 1.0}  # the default, its zero weight dropped
    for t in (added, capital, mixed, other):  # what the scorers decode is the route stamped here
        back = decode(encode(t))
        assert back.teacher_weights == t.teacher_weights and math.isclose(
            sum(back.teacher_weights.values()), 1
        )


def test_a_routing_field_other_than_task_is_read_from_the_answer_or_the_prompts_metadata():
    router = Router(load_config(None, [*TWO[:2], "routing.field=answer", "routing.routes={'15': {speller: 1}}",
                                        "routing.default=adder"]))  # fmt: skip
    assert _traj(router, PROBLEM).teacher_weights == {"speller": 1.0}
    assert _traj(router, dataclasses.replace(PROBLEM, answer="16")).teacher_weights == {"adder": 1.0}
    tagged = Router(load_config(None, [*TWO[:2], "routing.field=source", "routing.routes={web: {speller: 1}}",
                                        "routing.default=adder"]))  # fmt: skip
    t = _traj(tagged, dataclasses.replace(PROBLEM, metadata={"source": "web"}))
    assert t.task == {"answer": "15", "task": "addition", "source": "web"} and t.teacher_weights == {
        "speller": 1.0
    }


def test_each_trajectory_is_copied_to_the_stream_of_every_teacher_in_its_route():
    router = Router(load_config(None, TWO))
    trajs = [
        _traj(router, dataclasses.replace(PROBLEM, metadata={"task": task}))
        for task in ("addition", "both", "capitals", "both")
    ]
    by_stream, where = router.copies(trajs)
    assert by_stream == {"rt:rollouts:adder": [0, 1, 3], "rt:rollouts:speller": [1, 2, 3]}
    assert where[1] == [Copy("rt:rollouts:adder", 1), Copy("rt:rollouts:speller", 0)]
    assert router.all_streams() == ["rt:rollouts:adder", "rt:rollouts:speller"]
    assert [router.route_names(t.task) for t in trajs] == [["adder"], ["adder", "speller"], ["speller"]] + [
        ["adder", "speller"]
    ]


def test_while_a_teacher_is_down_the_prompts_routed_to_it_are_skipped_mixtures_included():
    """Router.pick, what Actor.draw asks for a batch while a pool is down (actors/routing.py docstring)."""
    router = Router(load_config(None, TWO))
    tagged = [
        "capitals",
        "addition",
        "both",
        "spelling",
        "addition",
        "addition",
    ]  # spelling: the default, speller

    def stream():
        return iter(dataclasses.replace(PROBLEM, prompt_id=f"p{i}", metadata={"task": t}) for i, t in
                    enumerate(tagged))  # fmt: skip

    picked, skipped = router.pick(stream(), 2, {"speller"}, 8)
    assert [p.prompt_id for p in picked] == ["p1", "p4"] and skipped == 3  # the mixture needs speller too
    picked, skipped = router.pick(stream(), 2, {"speller"}, 3)  # at most max_draws drawn
    assert [p.prompt_id for p in picked] == ["p1"] and skipped == 2
    picked, skipped = router.pick(stream(), 3, set(), 24)  # nothing down: simply the next n
    assert [p.prompt_id for p in picked] == ["p0", "p1", "p2"] and skipped == 0
    assert router.reachable({"speller"}) and router.reachable(
        {"adder"}
    )  # capitals and the default avoid adder
    assert not router.reachable({"adder", "speller"})
    one = Router(load_config(None, ["run.run_id=rt"]))
    assert one.reachable(set()) and not one.reachable({"default"})  # one teacher down: wait, as always


def test_a_scorer_refuses_rollouts_not_routed_to_its_teacher():
    router = Router(load_config(None, TWO))
    t = _traj(router, PROBLEM)  # routed to adder only
    assert route_problem(t, "adder", routed=True) is None
    assert "routed to ['adder'], not to teacher 'speller'" in route_problem(t, "speller", routed=True)
    t.teacher_weights = None
    assert "has no route (teacher_weights)" in route_problem(t, "adder", routed=True)
    assert route_problem(t, "default", routed=False) is None  # the one teacher of a run scores everything


def test_scorer_component_names_number_each_pool_on_its_own():
    assert component_name("default", 2) == "scorer-2"
    assert component_name("speller", 0) == "scorer-speller-0"


def test_an_unknown_teacher_exits_2_naming_the_flag_and_the_runs_teachers(capsys):
    assert main(load_config(None, TWO), 0, teacher="nobody") == 2
    err = capsys.readouterr().err
    assert "--teacher 'nobody'" in err and "adder, speller" in err
    assert main(load_config(None, []), 0, teacher="adder") == 2
    assert "leave --teacher out" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["teachers={a: {}, b: {model: {kind: pretrained, name_or_path: /m}}}", "routing.default=a"],
            "student.kind: tiny while teachers.b.model is pretrained",
        ),
        (
            ["teachers={a: {scorer: {topk: 4}}, b: {scorer: {topk: 4}}}", "routing.default=a"],
            "teachers.a.scorer.topk=4 but scorer.topk=0",
        ),
        (
            ["ray.num_cpus=2", "teachers={a: {scorer: {num_scorers: 2}}, b: {}}", "routing.default=a"],
            "scorers 0.75",  # 3 scorers x 0.25: one pool alone would fit
        ),
    ],
)
def test_cross_section_checks_see_every_teachers_pool(overrides, message):
    from opd.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value), str(err.value)
