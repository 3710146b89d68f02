"""The root of the config tree, and every check that spans sections.

Each section checks its own fields beside its model (e.g. learner.py refuses `micro_batch_size > batch_size`);
this module holds only what needs two or more sections at once, in one place, so a reader finds every combination
rule here. Checks that need code outside the core (the loss registry's) run in `load_config(checks=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field, PrivateAttr, TypeAdapter, ValidationError, model_validator

from opd.config.actor import ActorConfig
from opd.config.base import Strict, variant_tag
from opd.config.broker import DEFAULT_BROKER, BrokerConfig
from opd.config.images import ImagesConfig
from opd.config.learner import LearnerConfig
from opd.config.metrics import MetricsConfig
from opd.config.models import TEACHER_DEFAULTS, VLM_TEACHER_DEFAULTS, ModelConfig, TinyModel
from opd.config.pipeline import PipelineConfig
from opd.config.precision import check_cpu_bf16
from opd.config.ray import RayConfig
from opd.config.run import RunConfig
from opd.config.sampling import SamplingConfig
from opd.config.scaling import ScalingConfig
from opd.config.scorer import ScorerConfig
from opd.config.supervision import SupervisionConfig
from opd.config.task import (
    AdditionTask,
    TaskConfig,
    sft_task_problem,
    tiny_fits,
    vlm_build_task,
    vlm_fits,
)
from opd.config.teachers import DEFAULT_TEACHER, MAX_TEACHERS, RoutingConfig, TeacherSpec, check_teacher_name
from opd.config.weight_sync import WeightSyncConfig

DEPTH_PER_BATCH = 1  # broker.max_depth unset: this many learner batches per work stream

# The variant a tagged section gets when it names none: `student.sft_steps=50` needs no `student.kind=tiny`.
_DEFAULT_VARIANTS = {
    "task": AdditionTask,
    "student": TinyModel,
    "teacher": TinyModel,
    "broker": DEFAULT_BROKER,
}


@dataclass(frozen=True)
class TeacherPool:
    """One teacher as the components see it: its name, its model, and its scorer pool's resolved settings."""

    name: str
    model: ModelConfig
    scorer: ScorerConfig


_MODEL = TypeAdapter(ModelConfig)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` laid on top, mappings merged key by key (scorer.remote.url alone keeps the rest)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def _validated(adapter_or_model: Any, data: dict[str, Any], where: str) -> Any:
    try:
        if isinstance(adapter_or_model, TypeAdapter):
            return adapter_or_model.validate_python(data)
        return adapter_or_model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{where}.{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"
            if e["loc"]
            else f"{where}: {e['msg']}"
            for e in exc.errors()
        )
        raise ValueError(problems) from None


class Config(Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    task: TaskConfig = Field(default_factory=AdditionTask)
    student: ModelConfig = Field(default_factory=TinyModel)
    teacher: ModelConfig = Field(default_factory=lambda: TinyModel(**TEACHER_DEFAULTS))
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    actor: ActorConfig = Field(default_factory=ActorConfig)
    scorer: ScorerConfig = Field(default_factory=ScorerConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    broker: BrokerConfig = Field(default_factory=DEFAULT_BROKER)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    supervision: SupervisionConfig = Field(default_factory=SupervisionConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    teachers: dict[str, TeacherSpec] | None = Field(
        None,
        description="Several named teachers, each {model: <as the teacher section>, scorer: <overrides of the "
        "scorer section for its own pool>}. None = one teacher, `default`, from the teacher and scorer sections.",
    )
    routing: RoutingConfig = Field(default_factory=RoutingConfig)

    _pools: dict[str, TeacherPool] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _default_tags(cls, data: Any) -> Any:
        """Let `student.sft_steps=50` work without also writing `student.kind=tiny`."""
        if not isinstance(data, dict):
            return data
        for key, variant in _DEFAULT_VARIANTS.items():
            tag, default = variant_tag(variant)
            section = data.get(key)
            if isinstance(section, dict) and tag not in section:
                data[key] = {tag: default, **section}
        teacher = data.get("teacher")
        if isinstance(teacher, dict) and teacher.get("kind") == "tiny":
            data["teacher"] = {**TEACHER_DEFAULTS, **teacher}
        if isinstance(teacher, dict) and teacher.get("kind") == "tiny_vlm":
            data["teacher"] = {**VLM_TEACHER_DEFAULTS, **teacher}
        return data

    @model_validator(mode="after")
    def _derived_defaults(self) -> Config:
        """Defaults that follow another section's value, filled where the user set none. broker.max_depth: each
        work stream (rollouts, scored) holds at most one learner batch, so what waits in the queues is about two
        versions old when trained, inside the default learner.max_staleness of 4; a fixed 256 with a 64-sample
        batch had 95% of samples trained at the limit and many dropped."""
        if self.broker.max_depth is None:
            # per stream: with several teachers each has its own scored stream, where a batch's mixtures hold
            # one copy each (Streams.scored_for), so one batch per stream suffices there too
            self.broker.max_depth = self.learner.batch_size * DEPTH_PER_BATCH
        return self

    @model_validator(mode="after")
    def _teacher_pools(self) -> Config:
        """Resolve every teacher into a TeacherPool (model + its pool's scorer settings) and check the routes."""
        if self.teachers is None:
            self._pools = {DEFAULT_TEACHER: TeacherPool(DEFAULT_TEACHER, self.teacher, self.scorer)}
        else:
            self._pools = self._named_pools(self.teachers)
        self._routes_fit_teachers()
        return self

    def _named_pools(self, teachers: dict[str, TeacherSpec]) -> dict[str, TeacherPool]:
        if not teachers:
            raise ValueError(
                "teachers: name at least one teacher, or drop the key to use the teacher section"
            )
        if len(teachers) > MAX_TEACHERS:
            raise ValueError(f"teachers: {len(teachers)} teachers; at most {MAX_TEACHERS}")
        if "teacher" in self.model_fields_set:
            raise ValueError(
                "teacher: with teachers: set each teacher's model under teachers.<name>.model, not in the teacher "
                "section"
            )
        base = self.scorer.model_dump(mode="python")
        pools = {}
        for name, spec in teachers.items():
            check_teacher_name(name, f"teachers.{name}")
            raw = dict(spec.model)
            if raw.get("kind", "tiny") == "tiny":
                raw = {"kind": "tiny", **TEACHER_DEFAULTS, **raw}
            elif raw.get("kind") == "tiny_vlm":
                raw = {**VLM_TEACHER_DEFAULTS, **raw}
            model = _validated(_MODEL, raw, f"teachers.{name}.model")
            overrides = dict(spec.scorer)
            if spec.tokenizer is not None:
                if overrides.get("tokenizer", spec.tokenizer) != spec.tokenizer:
                    raise ValueError(
                        f"teachers.{name}.tokenizer={spec.tokenizer} but teachers.{name}.scorer.tokenizer="
                        f"{overrides['tokenizer']}; set one of them"
                    )
                overrides["tokenizer"] = spec.tokenizer
            scorer = _validated(ScorerConfig, _merged(base, overrides), f"teachers.{name}.scorer")
            pools[name] = TeacherPool(name, model, scorer)
        topks = {p.scorer.topk for p in pools.values()}
        if len(topks) > 1:
            detail = ", ".join(f"teachers.{p.name}.scorer.topk={p.scorer.topk}" for p in pools.values())
            raise ValueError(
                f"every teacher must attach the same top-k ({detail}); set one scorer.topk for all"
            )
        return pools

    def _routes_fit_teachers(self) -> None:
        names = list(self._pools)
        unknown = sorted(self.routing.named() - set(names))
        if unknown:
            raise ValueError(
                f"routing names teacher(s) {unknown} that teachers does not define; defined: {names}"
            )
        if len(names) > 1 and self.routing.default is None:
            raise ValueError(
                f"routing.default: with several teachers ({names}) name the teacher (or {{teacher: weight}} "
                "mixture) for prompts no route matches"
            )

    def teacher_pools(self) -> dict[str, TeacherPool]:
        """The run's teachers by name, in config order (one, `default`, without a teachers section)."""
        return dict(self._pools)

    def for_teacher(self, name: str) -> Config:
        """This config as one teacher's pool sees it: its model in `teacher` and its pool's settings in `scorer`, so
        code written for one teacher (the scorer backends, the model builds) serves any pool unchanged."""
        pools = self.teacher_pools()
        if name not in pools:
            raise ValueError(f"no teacher named {name!r}; the run's teachers: {list(pools)}")
        view = self.model_copy(update={"teacher": pools[name].model, "scorer": pools[name].scorer})
        view._pools = dict(pools)
        return view

    def unreached_teachers(self) -> list[str]:
        """Teachers no route or default gives a positive weight: their pools would score nothing (a warning,
        for the launcher to print; with one teacher and no routes it is reached by default)."""
        names = list(self._pools)
        reached = self.routing.reached() or {names[0]}
        if self.routing.default is None:
            reached.add(names[0])
        return [n for n in names if n not in reached]

    @model_validator(mode="after")
    def _combinations(self) -> Config:
        self._models_fit_task()
        self._topk_fits_learner()
        self._depth_fits_batch()
        self._cross_tokenizer_teachers_fit()
        self._ray_fits()
        self._sync_pipeline()
        self._stream_fits()
        self._devices_fit_weight_sync()
        self._bf16_fits_cpu()
        if self.actor.engine == "vllm" and self.sampling.top_p < 1.0:
            # vLLM's processed logprobs are taken after top-p truncation; raw ones before the temperature.
            raise ValueError(
                f"actor.engine: vllm with sampling.top_p {self.sampling.top_p}: vLLM's logprobs would describe "
                "the top-p-truncated distribution, not log_softmax(logits / T) the learner recomputes; set "
                "sampling.top_p: 1 or actor.engine: hf"
            )
        return self

    def _teacher_roles(self) -> list[tuple[str, TeacherPool]]:
        """Every teacher pool with the config path its errors name: `teacher` for the one teacher of a run
        without a teachers section (its settings are the teacher and scorer sections), `teachers.<name>.model`
        otherwise."""
        if self.teachers is None:
            return [("teacher", pool) for pool in self._pools.values()]
        return [(f"teachers.{name}.model", pool) for name, pool in self._pools.items()]

    def _models_fit_task(self) -> None:
        """Tiny models know only the built-in digit tasks' characters, and the student must share one tokenizer
        with every teacher."""
        models = [("student", self.student), *((role, pool.model) for role, pool in self._teacher_roles())]
        for role, model in models:
            if model.kind == "tiny" and not tiny_fits(self.task):
                other = "{kind: tiny_vlm}" if vlm_fits(self.task) else "{kind: pretrained, name_or_path: ...}"
                raise ValueError(
                    f"{role}.kind: tiny models are built for the built-in task only (addition or reversal, or "
                    f"a mixture of them); with task.kind: {self.task.kind} set {role}: {other}"
                )
            if model.kind == "tiny" and (problem := sft_task_problem(model.sft_task, self.task)):
                raise ValueError(f"{role}.sft_task: {problem}")
            self._vlm_fits_task(role, model)
            if role != "student" and getattr(model, "freeze_vision", False):
                raise ValueError(
                    f"{role}.freeze_vision: only the student is trained; set student.freeze_vision instead"
                )
        for role, pool in self._teacher_roles():
            model = pool.model
            if pool.scorer.tokenizer == "different":
                continue  # a teacher of another tokenizer by declaration: any pair of models
            if (
                self.student.kind == model.kind == "tiny"
                and self.student.tokenizer_id() != model.tokenizer_id()
            ):
                raise ValueError(
                    f"{role}.tokenizer: {model.tokenizer_id()} but student.tokenizer: {self.student.tokenizer_id()}; "
                    "a teacher of another tokenizer must be declared: set tokenizer: different on it "
                    "(teachers.<name>.tokenizer, or scorer.tokenizer)"
                )
            if (self.student.kind == "tiny") != (model.kind == "tiny"):
                tiny = "student" if self.student.kind == "tiny" else role
                other = (
                    "the other model" if self.teachers is None else (role if tiny == "student" else "student")
                )
                raise ValueError(
                    f"{tiny}.kind: tiny while {other} is pretrained; student and teacher must share a "
                    "tokenizer: use kind: tiny for both (built-in tokenizer) or kind: pretrained for both"
                )

    def _vlm_fits_task(self, role: str, model: ModelConfig) -> None:
        """A tiny vision-language model is built on the visual task (a JSONL task's too: opd.config.task.
        vlm_build_task), with patches that tile its images."""
        if model.kind != "tiny_vlm":
            return
        built_on = vlm_build_task(self.task)
        if built_on is None:
            raise ValueError(
                f"{role}.kind: tiny_vlm models are built for task.kind: visual_digits (or a jsonl task of digit "
                f"images, as scripts/make_visual_jsonl.py writes); with task.kind: {self.task.kind} use kind: tiny "
                "or kind: pretrained"
            )
        if built_on.image_size % model.patch_size:
            field = "task.image_size" if built_on is self.task else "the visual_digits task's image_size"
            raise ValueError(
                f"{role}.patch_size {model.patch_size} does not divide {field} {built_on.image_size}; "
                "pick a patch_size that divides it"
            )

    def _topk_fits_learner(self) -> None:
        """The learner reads the run's top-k width (its contract and the top-k losses' check) and the teachers'
        temperature (every scored copy is checked against it) from the scorer section, so named teachers' pools
        must attach exactly that width and score at that temperature."""
        if self.teachers is None:
            return
        for name, pool in self._pools.items():
            for key in ("topk", "temperature"):
                mine, run = getattr(pool.scorer, key), getattr(self.scorer, key)
                if mine != run:
                    raise ValueError(
                        f"teachers.{name}.scorer.{key}={mine} but scorer.{key}={run}: the learner reads "
                        f"scorer.{key}; set scorer.{key}: {mine} (every teacher uses the same {key}) and drop the "
                        "per-teacher value"
                    )

    def _cross_tokenizer_teachers_fit(self) -> None:
        """A teacher of another tokenizer behind a server (`engine: remote`) is sent its own token ids, so this
        run must have its tokenizer locally: the teacher section names it (kind: pretrained, with
        `tokenizer` or `name_or_path` the server's model's tokenizer; nothing is loaded but the tokenizer)."""
        for role, pool in self._teacher_roles():
            if (
                pool.scorer.tokenizer == "different"
                and pool.scorer.engine == "remote"
                and pool.model.kind != "pretrained"
            ):
                raise ValueError(
                    f"{role}: a remote teacher declared tokenizer: different needs its tokenizer here: set "
                    f"{role}.kind: pretrained and {role}.name_or_path (or .tokenizer) to the server model's "
                    "tokenizer (a directory, hub id or .gguf)"
                )

    def _depth_fits_batch(self) -> None:
        """A batch's scored entries stay pending (unacknowledged, so counted against broker.max_depth) until its
        optimiser step: a depth below learner.batch_size could never fill a batch, and the learner would stop at
        batch_timeout_s while every scorer waited for room. Mixtures need no more: the copies held for a join are
        spooled and acknowledged at once (learner/spool.py), and the copies that complete a batch's joins are at
        most one per trajectory of the batch, whichever teachers' streams they come on."""
        need = self.learner.batch_size
        if self.broker.max_depth < need:
            raise ValueError(
                f"broker.max_depth={self.broker.max_depth} is less than learner.batch_size={need}: a batch could "
                "never be filled (a scored stream holds every entry of the batch until it is trained); set "
                f"broker.max_depth: {need} or more, or leave it unset"
            )

    def _devices_fit_weight_sync(self) -> None:
        """NCCL runs only between CUDA devices; refuse it at load time rather than at the first broadcast."""
        if self.weight_sync.backend != "nccl":
            return
        if "cuda" not in self.learner.device:
            raise ValueError("weight_sync.backend: nccl needs learner.device: cuda; use backend: gloo on CPU")
        if "cuda" not in self.actor.device:
            raise ValueError(
                f"weight_sync.backend: nccl needs actor.device: cuda (got {self.actor.device}); "
                "use backend: gloo or auto"
            )

    def _bf16_fits_cpu(self) -> None:
        """A model loaded in bf16 on a CPU (student in the actors, each teacher in its pool's scorers) needs native
        bf16; the learner's own precision is checked in its section (it upcasts a bf16 student to fp32 master
        weights)."""
        uses = [("student", self.student, "actor", self.actor.device, True)]
        for role, pool in self._teacher_roles():
            where = "scorer" if self.teachers is None else f"teachers.{pool.name}.scorer"
            uses.append((role, pool.model, where, pool.scorer.device, pool.scorer.teacher_is_local))
        for role, model, where, device, loaded in uses:
            if loaded and model.kind == "pretrained" and model.dtype == "bfloat16" and "cuda" not in device:
                check_cpu_bf16(
                    f"{role}.dtype", f"use {role}.dtype: float32 on this CPU (or {where}.device: cuda)"
                )

    def _ray_fits(self) -> None:
        """A local Ray smaller than what the components reserve would leave one waiting to be placed."""
        r = self.ray
        if r.address is not None or r.num_cpus is None:
            return
        parts = {
            # A broker that is a server outside the run (not a process of it) reserves nothing in Ray.
            "broker": r.broker.num_cpus if self.broker.embedded_process else 0.0,
            "learner": self.learner.num_ranks * r.learner.num_cpus,  # one actor per learner rank
            "actors": self.actor.num_actors * r.actor.num_cpus,
            # every teacher's pool starts its own scorers
            "scorers": sum(p.scorer.num_scorers for p in self._pools.values()) * r.scorer.num_cpus,
        }
        if sum(parts.values()) > r.num_cpus + 1e-9:
            detail = " + ".join(f"{k} {v:g}" for k, v in parts.items())
            raise ValueError(
                f"ray.num_cpus={r.num_cpus} is less than the components reserve at start ({detail}); "
                "raise ray.num_cpus or lower ray.<role>.num_cpus"
            )

    def inflight(self) -> int:
        """Sequences an actor keeps generating at once: actor.max_inflight in stream generation (its default,
        and batch generation's batch, prompts_per_batch x sampling.n)."""
        return self.actor.max_inflight or self.actor.prompts_per_batch * self.sampling.n

    def _stream_fits(self) -> None:
        """Stream generation admits a GRPO group whole (group rewards need all n), and has no batch for
        lockstep to wait on."""
        if self.actor.generation != "stream":
            return
        if self.inflight() < self.sampling.n:
            raise ValueError(
                f"actor.max_inflight {self.inflight()} is less than sampling.n {self.sampling.n}: a group of n is "
                f"admitted whole; set actor.max_inflight >= {self.sampling.n}"
            )
        if self.pipeline.mode == "sync":
            raise ValueError(
                "pipeline.mode: sync needs actor.generation: batch (lockstep waits for the weights trained on "
                "each batch; a streaming actor has no batch); set actor.generation: batch or pipeline.mode: async"
            )

    def _sync_pipeline(self) -> None:
        """Lockstep needs one generation round to be exactly one learner batch, and new weights after every
        batch; otherwise the learner waits for data no actor will make (or actors for weights never sent)."""
        if self.pipeline.mode != "sync":
            return
        made = self.actor.num_actors * self.actor.prompts_per_batch * self.sampling.n
        if made != self.learner.batch_size:
            raise ValueError(
                f"pipeline.mode: sync needs actor.num_actors x actor.prompts_per_batch x sampling.n "
                f"({self.actor.num_actors} x {self.actor.prompts_per_batch} x {self.sampling.n} = {made}) to "
                f"equal learner.batch_size ({self.learner.batch_size}); set learner.batch_size={made} or change "
                "the actor side"
            )
        if self.weight_sync.every != 1:
            raise ValueError(
                f"pipeline.mode: sync needs weight_sync.every: 1 (got {self.weight_sync.every}): each actor waits "
                "for the weights trained on its batch; set weight_sync.every=1"
            )
