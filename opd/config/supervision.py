"""The supervision section: how `opd run` judges, restarts and gives up on the component processes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from opd.config.base import Strict


class SupervisionConfig(Strict):
    """What the launcher does when a worker dies, and how it knows which components are alive (see README)."""

    restart: Literal["no", "on-failure"] = Field(
        "no",
        description=(
            "on-failure: restart an actor or scorer the launcher started when it exits with an error (as "
            "docker-compose does), and the whole learner group (every rank, from the newest checkpoint and "
            "replay log, the actors with it) when one learner rank does; no: leave it dead. Scorers and the "
            "learner are restarted only on a broker that redelivers their pending entries (Redis); elsewhere "
            "`opd run --resume` continues a run."
        ),
    )
    max_restarts: int = Field(
        3,
        ge=0,
        description="Restarts per component (e.g. scorer-1; the learner group counts as one) before it is left "
        "dead (the learner: the run ends).",
    )
    restart_backoff_s: float = Field(
        1.0,
        ge=0,
        description="Wait before a restart; doubled for each further restart of the same component.",
    )
    role_grace_s: float = Field(
        30.0,
        ge=0,
        description=(
            "The run stops (exit 1) once a role (actor, scorer) has had no live member, started by the "
            "launcher or by hand, for this many seconds."
        ),
    )
    heartbeat_s: float = Field(
        2.0,
        ge=0,
        description=(
            "Seconds between a component's heartbeats on the metrics stream (its counters, also while idle); "
            "0: no heartbeat thread."
        ),
    )
    liveness_s: float = Field(
        10.0,
        gt=0,
        description=(
            "A component the launcher did not start counts as alive while its newest metrics record or "
            "heartbeat is younger than this. With several teachers an actor also treats a teacher's pool as down "
            "(and generates only prompts routed elsewhere) once its rollouts stream has taken none of the actor's "
            "waiting copies for this long."
        ),
    )

    learner_silence_s: float = Field(
        300.0,
        ge=0,
        description=(
            "An actor or scorer stops (exit 1) once no record of the learner (its metrics or heartbeat) has "
            "reached it for this many seconds, counting from its own start and never counting time the broker "
            "was unreachable (then broker.request_timeout_s rules): workers started by hand, without a launcher "
            "to stop them, do not outlive their learner. 0: never (they wait for the learner's stop message)."
        ),
    )

    @field_validator("restart", mode="before")
    @classmethod
    def _yaml_no(cls, v: object) -> object:
        """YAML 1.1 reads an unquoted `restart: no` (and `supervision.restart=no`) as false: the same wish."""
        return "no" if v is False else v

    @model_validator(mode="after")
    def _heartbeat_fits_liveness(self) -> SupervisionConfig:
        if self.heartbeat_s > 0 and self.heartbeat_s * 2 > self.liveness_s:
            raise ValueError(
                f"supervision.heartbeat_s ({self.heartbeat_s}) must be at most half of supervision.liveness_s "
                f"({self.liveness_s}), or one late heartbeat makes a live component look dead; raise liveness_s"
            )
        if self.learner_silence_s and self.learner_silence_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"supervision.learner_silence_s ({self.learner_silence_s}) must be at least twice "
                f"supervision.heartbeat_s ({self.heartbeat_s}), or a late heartbeat stops the workers; raise it"
            )
        return self
