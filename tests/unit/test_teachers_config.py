"""Several teachers (issue 18), the interface every part builds on: `teachers` resolves into one TeacherPool per
name (model + its pool's scorer settings laid over the `scorer` section), `routing` maps a prompt's metadata to
normalised teacher weights, and the protocol carries the route (`teacher_weights`) and the scoring pool
(`teacher_name`) with the same name rule as the config."""

from __future__ import annotations

import numpy as np
import pytest

from broker.base import dead_letter_stream, is_work_stream
from opd.config import ConfigError, load_config
from opd.config import teachers as config_teachers
from opd.protocol import TEACHER_NAME, ProtocolError, Streams, Trajectory, decode, encode

TWO = ["teachers={adder: {model: {sft_steps: 10}}, speller: {scorer: {num_scorers: 2, topk: 0}}}"]


def test_one_name_rule_in_config_and_protocol():
    assert config_teachers.TEACHER_NAME.pattern == TEACHER_NAME.pattern


def test_without_teachers_the_one_teacher_is_default_from_the_teacher_and_scorer_sections():
    cfg = load_config(None, ["scorer.num_scorers=3"])
    (pool,) = cfg.teacher_pools().values()
    assert pool.name == "default" and pool.model == cfg.teacher and pool.scorer.num_scorers == 3
    assert cfg.routing.route({"task": "addition"}, ["default"]) == {"default": 1.0}
    assert cfg.unreached_teachers() == []


def test_named_teachers_lay_their_scorer_over_the_scorer_section():
    cfg = load_config(None, [*TWO, "scorer.batch_size=7", "routing.default=adder"])
    pools = cfg.teacher_pools()
    assert list(pools) == ["adder", "speller"]
    assert (
        pools["adder"].model.sft_steps == 10 and pools["adder"].model.hidden_size == 128
    )  # teacher defaults
    assert pools["speller"].scorer.num_scorers == 2 and pools["speller"].scorer.batch_size == 7
    assert pools["adder"].scorer.num_scorers == 1
    assert cfg.unreached_teachers() == ["speller"]


def test_routes_normalise_weights_and_drop_zeros():
    cfg = load_config(
        None,
        [*TWO, "routing.default={adder: 1, speller: 3}", "routing.routes={addition: {adder: 2, speller: 0}}"],
    )
    names = list(cfg.teacher_pools())
    assert cfg.routing.route({"task": "addition"}, names) == {"adder": 1.0}
    assert cfg.routing.route({"task": "other"}, names) == {"adder": 0.25, "speller": 0.75}
    assert cfg.routing.route({}, names) == {"adder": 0.25, "speller": 0.75}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["teachers={Adder: {}}"], "teachers.Adder: teacher name"),
        (TWO, "routing.default: with several teachers"),
        ([*TWO, "routing.default=nobody"], "routing names teacher(s) ['nobody']"),
        (
            [*TWO, "routing.default=adder", "routing.routes={x: {adder: -1}}"],
            "routing.routes.x.adder: weight -1.0 must be",
        ),
        ([*TWO, "routing.default=adder", "routing.routes={x: {adder: 0}}"], "the weights sum to 0"),
        (["teachers={a: {scorer: {nope: 1}}}"], "teachers.a.scorer.nope"),
        (["teachers={a: {model: {kind: pretrained}}}"], "teachers.a.model"),
        (["teachers={a: {scorer: {topk: 4}}, b: {}}", "routing.default=a"], "the same top-k"),
        (["teachers={}"], "name at least one teacher"),
    ],
)
def test_bad_teachers_and_routes_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value), str(err.value)


def test_a_teacher_section_beside_teachers_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher: {kind: tiny}\nteachers: {a: {}}\n")
    with pytest.raises(ConfigError, match="teachers.<name>.model"):
        load_config(path)


def _traj(**kw) -> Trajectory:
    return Trajectory(
        run_id="r", prompt_id="p", group_id="g", sample_index=0,
        prompt_token_ids=np.array([1, 2], np.int32), response_token_ids=np.array([3], np.int32),
        behaviour_logprobs=np.array([-1.0], np.float32), policy_version=0, **kw,
    )  # fmt: skip


def test_the_route_and_the_scoring_pool_travel_and_are_validated():
    back = decode(encode(_traj(teacher_weights={"adder": 0.25, "speller": 0.75}, teacher_name="adder")))
    assert back.teacher_weights == {"adder": 0.25, "speller": 0.75} and back.teacher_name == "adder"
    assert decode(encode(_traj())).teacher_weights is None
    for bad in ({"adder": 0.5}, {"Adder": 1.0}, {"adder": float("nan")}, {}, {"adder": True}):
        with pytest.raises(ProtocolError, match="teacher_weights"):
            decode(encode(_traj(teacher_weights=bad)))
    with pytest.raises(ProtocolError, match="teacher_name"):
        decode(encode(_traj(teacher_name="has space")))


def test_each_named_teacher_has_its_own_rollouts_stream():
    streams = Streams("run")
    assert streams.rollouts_for("default") == streams.rollouts == "run:rollouts"
    assert streams.rollouts_for("adder") == "run:rollouts:adder"


def test_a_pool_sees_the_config_with_its_own_teacher_and_scorer():
    cfg = load_config(None, [*TWO, "routing.default=adder"])
    view = cfg.for_teacher("speller")
    assert view.scorer.num_scorers == 2 and view.teacher.sft_steps == 1500
    assert cfg.for_teacher("adder").teacher.sft_steps == 10 and cfg.scorer.num_scorers == 1
    assert list(view.teacher_pools()) == ["adder", "speller"]
    with pytest.raises(ValueError, match="no teacher named 'nobody'"):
        cfg.for_teacher("nobody")


def test_each_teachers_scored_stream_holds_a_batch_of_mixtures():
    # held copies are spooled, so a batch of 8 mixtures holds at most 8 completing copies pending in a stream:
    # the derived depth is one batch whatever the route's width, and a depth below the batch is refused, as for
    # a single teacher (a batch is pending until its step)
    mix = [*TWO, "routing.default={adder: 1, speller: 1}", "learner.batch_size=8"]
    assert load_config(None, mix).broker.max_depth == 8
    assert load_config(None, [*TWO, "routing.default=adder", "learner.batch_size=8"]).broker.max_depth == 8
    assert load_config(None, [*mix, "broker.max_depth=8"]).broker.max_depth == 8
    with pytest.raises(ConfigError, match=r"broker.max_depth=7 is less than learner.batch_size=8"):
        load_config(None, [*mix, "broker.max_depth=7"])
    with pytest.raises(ConfigError, match=r"broker.max_depth=7 is less than learner.batch_size=8"):
        load_config(None, ["learner.batch_size=8", "broker.max_depth=7"])
    streams = Streams("run")
    assert streams.scored_for("default") == "run:scored" and streams.scored_for("adder") == "run:scored:adder"
    assert is_work_stream("run:scored:adder") and dead_letter_stream("run:scored:adder") == "run:dead_letter"


def test_every_teacher_scores_at_the_runs_temperature():
    with pytest.raises(
        ConfigError, match=r"teachers.adder.scorer.temperature=2.0 but scorer.temperature=1.0"
    ):
        load_config(None, [*TWO, "routing.default=adder", "teachers.adder.scorer.temperature=2"])
