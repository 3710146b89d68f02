"""Build (once) and locate the tokenizer, teacher and initial student a run needs.

No model can be downloaded here, so the demo's teacher and student are trained by this module on the built-in
task from a recipe: everything that shapes them (their config section, the task, the answer length), named by its
hash. The built-in configs' models ship in `opd/demo_models/` (with `manifest.json`: each one's recipe, its hash and
its files' sha256), so a fresh clone starts at once; any other recipe is built on first use and cached under
`run.cache_dir`. A build is deterministic: fixed seeds, deterministic algorithms and a fixed thread count
(`opd.runtime.threads.BUILD_THREADS`) give the same bytes on any machine load or `OMP_NUM_THREADS`, which is what
lets `opd prepare --rebuild` check a shipped model against its recipe. Pretrained models load as named, except a
GGUF file or a catalog name (converted once into the cache: opd.models.gguf) and a pruned model (cut once from
its source: opd.models.prune).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opd import tasks
from opd.config import Config, TinyModel, TinyVlmModel
from opd.images import ImageBlob
from opd.models import gguf, prune, vlm
from opd.models.loading import (
    build_bpe_tokenizer,
    build_char_tokenizer,
    encode_prompt,
    load_model,
    load_tokenizer,
    sft_optimizer,
)
from opd.models.prompts import prompt_ids, stop_token_ids
from opd.models.sampler import sample
from opd.models.vision import batch_pixels, vision_of
from opd.runtime.progress import progress
from opd.runtime.threads import BUILD_THREADS, threads

ASSET_FORMAT = 2  # bump when the build recipe changes, so stale caches are rebuilt
SHIPPED = Path(__file__).resolve().parents[1] / "demo_models"  # the built-in configs' models, committed
MANIFEST = "manifest.json"
# The text a BPE tokenizer learns its merges from: this many training problems (prompt + answer) of the run's task,
# drawn with this seed. Part of a BPE model's recipe and its tokenizer's name, so a change rebuilds both.
BPE_CORPUS = {"seed": 0, "problems": 20_000}
HABIT = "="  # the spurious trailing token of `sft_suffix_noise`: one token, so greedy decoding picks it up
# An evaluation with no `log` of its own is reported (to this module's logger) only if it is slower than this.
QUIET_EVAL_S = 2.0
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelAsset:
    path: str  # what `from_pretrained` gets
    tokenizer: str
    dtype: str
    eval_accuracy: float | None = None  # measured when the asset was built
    # per task of a mixture (`Problem.metadata["task"]`), measured with eval_accuracy; None for a single task
    eval_accuracy_by_task: dict[str, float] | None = None


@dataclass(frozen=True)
class Assets:
    student: ModelAsset
    teacher: ModelAsset


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _atomic_dir(final: Path, build) -> None:
    """Build into a temporary sibling, then rename, so a crash never leaves a half-written cache entry."""
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    try:
        tmp.rename(final)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class EvalResult:
    """One held-out evaluation: the accuracy over the problems it reached before its budget ran out, overall and
    per task of a mixture (problems tagged `metadata["task"]`; empty for a single task's untagged problems)."""

    accuracy: float  # correct / problems (nan when none were evaluated)
    problems: int  # problems evaluated
    total: int  # problems in the held-out set
    seconds: float
    by_task: dict[str, float] = field(default_factory=dict)  # task name -> correct / its problems evaluated
    problems_by_task: dict[str, int] = field(default_factory=dict)  # task name -> its problems evaluated

    @property
    def complete(self) -> bool:
        return self.problems == self.total


def evaluate(
    model,
    tokenizer,
    problems: list[tasks.Problem],
    max_new_tokens: int,
    mode: str,
    batch: int = 256,
    *,
    log=None,
    what: str = "the model",
) -> float:
    """Greedy held-out accuracy over every problem (`evaluate_within` without a budget)."""
    return evaluate_within(
        model, tokenizer, problems, max_new_tokens, mode, batch, log=log, what=what
    ).accuracy


def evaluate_within(
    model,
    tokenizer,
    problems: list[tasks.Problem],
    max_new_tokens: int,
    mode: str,
    batch: int = 256,
    *,
    budget_s: float | None = None,
    cancel=None,
    log=None,
    what: str = "the model",
    vision=None,
) -> EvalResult:
    """Greedy held-out accuracy, `batch` problems per generation, with progress per batch through `log`
    (`opd.runtime.progress`). Without a `log` (the learner's periodic evaluation) it goes to this module's logger,
    and only when it takes over QUIET_EVAL_S, so a quick evaluation every few steps adds nothing to a component's
    log.

    `budget_s`: a batch starts only if it should end within this many seconds of the start (judged by the
    slowest batch so far), so an evaluation of a real model (minutes for a full held-out set on a CPU) stays
    within it unless one batch alone is longer. The result counts the problems it reached: always at least one
    batch, and always the first ones of the set (evaluations cut by the same budget compare the same problems).
    `cancel`: a callable checked between batches (a stopping learner), which ends it the same way."""
    t0 = time.perf_counter()
    if not problems:
        return EvalResult(float("nan"), 0, 0, 0.0)
    quiet = QUIET_EVAL_S if log is None else 0.0
    deadline = None if budget_s is None else t0 + budget_s

    def more(batch_s: float) -> bool:
        if cancel is not None and cancel():
            return False
        return deadline is None or time.perf_counter() + batch_s <= deadline

    with progress(
        f"evaluating {what}", len(problems), "problems", log or _log.info, quiet_under_s=quiet
    ) as bar:
        verdicts = _greedy_correct(model, tokenizer, problems, max_new_tokens, mode, batch, bar, more, vision)
    by_task: dict[str, list[bool]] = {}
    for p, ok in zip(problems, verdicts, strict=False):  # the problems reached
        if "task" in p.metadata:
            by_task.setdefault(p.metadata["task"], []).append(ok)
    return EvalResult(
        sum(verdicts) / len(verdicts),
        len(verdicts),
        len(problems),
        time.perf_counter() - t0,
        by_task={name: sum(v) / len(v) for name, v in by_task.items()},
        problems_by_task={name: len(v) for name, v in by_task.items()},
    )


def _eval_prompts(model, tokenizer, chunk: list[tasks.Problem], vision) -> tuple[list[list[int]], object]:
    """The prompts' ids as the actors make them and, for problems with images, their pixel values (the
    model's Vision: passed, or kept on it by opd.models.vlm.load_vlm)."""
    if not any(p.images for p in chunk):
        return [prompt_ids(tokenizer, p) for p in chunk], None
    if vision is None:
        raise ValueError(
            "held-out problems have images but the model is text-only: use a vision-language model"
        )
    made = [vision.expand(prompt_ids(tokenizer, p), [ImageBlob.of(b) for b in p.images]) for p in chunk]
    return [ids for ids, _ in made], batch_pixels([px for _, px in made])


def _greedy_correct(
    model, tokenizer, problems, max_new_tokens: int, mode: str, batch: int, bar, more, vision=None
):
    """Whether each of the first problems was solved, one batch at a time while `more(slowest batch's seconds)`
    (the first batch always)."""
    vision = vision or vision_of(model)
    was_training = model.training
    model.eval()
    verdicts: list[bool] = []
    slowest = 0.0
    for i in range(0, len(problems), batch):
        if i and not more(slowest):
            break
        t0 = time.perf_counter()
        chunk = problems[i : i + batch]
        prompts, pixels = _eval_prompts(model, tokenizer, chunk, vision)
        outs = sample(
            model,
            prompts,
            eos_id=stop_token_ids(tokenizer, chunk[0].chat_template),
            pad_id=tokenizer.pad_token_id,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            pixel_values=pixels,
        )
        for p, o in zip(chunk, outs, strict=True):
            text = tokenizer.decode(o.response_ids, skip_special_tokens=True)
            verdicts.append(bool(tasks.verify(p.answer, text, mode)))
        slowest = max(slowest, time.perf_counter() - t0)
        bar.advance(len(chunk))
    model.train(was_training)
    return verdicts


def _sft(model, tokenizer, spec: TinyModel, cfg: Config, bar) -> None:
    """Teacher-forced cross-entropy on the answer tokens of fresh training problems (of `spec.sft_task` alone when
    set: an expert of one task of the mixture); `bar` advances per step."""
    task = cfg.task if spec.sft_task is None else tasks.subtask(cfg.task, spec.sft_task)
    stream = tasks.training_stream(task, seed=spec.seed + 1)
    opt, sched = sft_optimizer(model, spec.sft_lr, spec.sft_steps)
    noise = random.Random(spec.seed + 2)
    model.train()
    for _ in range(spec.sft_steps):
        rows = []
        for _ in range(spec.sft_batch_size):
            p = next(stream)
            prompt = encode_prompt(tokenizer, p.prompt)
            target = p.answer + (HABIT if noise.random() < spec.sft_suffix_noise else "")
            answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append((prompt, answer))
        width = max(len(a) + len(b) for a, b in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for i, (a, b) in enumerate(rows):
            ids[i, : len(a) + len(b)] = torch.tensor(a + b)
            labels[i, len(a) : len(a) + len(b)] = torch.tensor(b)
        loss = model(
            input_ids=ids, attention_mask=(labels != -100) | (ids != tokenizer.pad_token_id), labels=labels
        ).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.advance()


def _build_tiny(final: Path, role: str, spec: TinyModel, tok_dir: Path, cfg: Config, log) -> None:
    def build(tmp: Path) -> None:
        tokenizer = load_tokenizer(tok_dir)
        torch.manual_seed(spec.seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_heads,
            max_position_embeddings=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
        t0 = time.time()
        with progress(f"building the {role} (SFT)", spec.sft_steps, "steps", log) as bar:
            _sft(model, tokenizer, spec, cfg, bar)
        result = evaluate_within(
            model,
            tokenizer,
            tasks.eval_set(cfg.task),
            cfg.sampling.max_new_tokens,
            "exact",
            log=log,
            what=f"the {role}",
        )
        acc, per_task = result.accuracy, "".join(f", {k} {v:.3f}" for k, v in result.by_task.items())
        log(
            f"  built {final.name}: {spec.sft_steps} SFT steps in {time.time() - t0:.0f}s, held-out accuracy "
            f"{acc:.3f}{per_task}"
        )
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = {"eval_accuracy": acc, "spec": spec.recipe_fields()}
        if result.by_task:  # only a mixture's: a single task's record keeps its bytes
            meta["eval_accuracy_by_task"] = result.by_task
        (tmp / "opd_asset.json").write_text(json.dumps(meta))

    with _deterministic():
        _atomic_dir(final, build)


@contextlib.contextmanager
def _deterministic():
    """The build's fixed thread count and deterministic kernels, for its duration only (the caller's own settings
    come back after). Seeds are the recipe's own (`spec.seed` and the streams derived from it)."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with threads(BUILD_THREADS):
            yield
    finally:
        torch.use_deterministic_algorithms(was)


def recipe(role: str, spec: TinyModel, cfg: Config) -> list:
    """Everything that shapes a built model; its digest names the model in the cache and in `opd/demo_models/`.
    A BPE model's adds its tokenizer's corpus (its size and merges are in the fields, its text is the task's): a
    character model's recipe is as it was before BPE existed, so its name and the shipped bytes stay."""
    out = [ASSET_FORMAT, role, spec.recipe_fields(), cfg.task.model_dump(), cfg.sampling.max_new_tokens]
    return [*out, {"bpe_corpus": BPE_CORPUS}] if spec.tokenizer == "bpe" else out


def model_recipe(role: str, spec: TinyModel | TinyVlmModel, cfg: Config) -> list:
    """A built model's recipe, by its kind: a text model's (`recipe`) or a tiny VLM's (`opd.models.vlm.recipe`)."""
    return vlm.recipe(role, spec, cfg) if spec.kind == "tiny_vlm" else recipe(role, spec, cfg)


def asset_name(rec: list) -> str:
    """The directory name of the model a recipe builds, in the cache and in `opd/demo_models/`: `<role>-<digest>`
    for a text model, `<role>-vlm-<digest>` for a tiny VLM (its recipe's model fields say `kind: tiny_vlm`)."""
    vision = "vlm-" if rec[2].get("kind") == "tiny_vlm" else ""
    return f"{rec[1]}-{vision}{_digest(rec)}"


def _find(name: str, cfg: Config, rebuild: bool) -> Path:
    """Where the model `name` is looked for: the shipped copy when there is one (and no rebuild is asked), else
    the cache (where a build puts it)."""
    if not rebuild and (SHIPPED / name / "opd_asset.json").is_file():
        return SHIPPED / name
    return Path(cfg.run.cache_dir) / name


def _tiny_asset(role: str, spec: TinyModel, cfg: Config, log, rebuild: bool) -> ModelAsset:
    """The shipped model of this recipe if there is one, else the cached one, built first (with the tokenizer
    `spec` names, `_tok_dir`) if missing. `rebuild`: build it again into the cache from its recipe, whatever
    exists."""
    final = _find(asset_name(recipe(role, spec, cfg)), cfg, rebuild)
    if rebuild or not (final / "opd_asset.json").is_file():
        bpe = f", BPE tokenizer of {spec.bpe_vocab_size}" if spec.tokenizer == "bpe" else ""
        log(
            f"building the {role} ({spec.num_layers} layers, hidden {spec.hidden_size}, {spec.sft_steps} SFT "
            f"steps{bpe}, {BUILD_THREADS} thread); cached for later runs"
        )
        shutil.rmtree(final, ignore_errors=True)
        _build_tiny(final, role, spec, _tok_dir(cfg, spec), cfg, log)
    meta = json.loads((final / "opd_asset.json").read_text())
    return ModelAsset(
        path=str(final),
        tokenizer=str(final),
        dtype="float32",
        eval_accuracy=meta["eval_accuracy"],
        eval_accuracy_by_task=meta.get("eval_accuracy_by_task"),
    )


def _vlm_asset(role: str, spec: TinyVlmModel, cfg: Config, log, rebuild: bool) -> ModelAsset:
    """The shipped tiny vision-language model of this recipe (opd.models.vlm) if there is one, else the cached one,
    built first if missing (`rebuild`: built again into the cache whatever exists). Its directory holds the model,
    the processor and the tokenizer."""
    final = _find(asset_name(vlm.recipe(role, spec, cfg)), cfg, rebuild)
    if rebuild or not (final / "opd_asset.json").is_file():
        Path(cfg.run.cache_dir).mkdir(parents=True, exist_ok=True)
        log(
            f"building the {role} VLM (text {spec.num_layers} layers, hidden {spec.hidden_size}; vision "
            f"{spec.vision_layers} layers, hidden {spec.vision_hidden_size}; {spec.sft_steps} SFT steps, "
            f"{BUILD_THREADS} thread); cached for later runs"
        )
        shutil.rmtree(final, ignore_errors=True)
        with _deterministic():
            _atomic_dir(final, lambda tmp: vlm.build_into(tmp, role, spec, cfg, log))
    meta = json.loads((final / "opd_asset.json").read_text())
    return ModelAsset(
        path=str(final), tokenizer=str(final), dtype="float32", eval_accuracy=meta["eval_accuracy"]
    )


def _pretrained_asset(role: str, cfg: Config, log) -> ModelAsset:
    """A pretrained model's directory: as named, a catalog name's, a GGUF's conversion, or a pruned model's cut,
    made once in the cache (opd.models.gguf, opd.models.prune). A teacher behind a server is passed as named."""
    spec, cache = getattr(cfg, role), cfg.run.cache_dir
    cut_from_teacher = cfg.student.kind == "pruned" and cfg.student.source == "teacher"
    if (
        spec.kind == "pretrained"
        and role == "teacher"
        and not cfg.scorer.teacher_is_local
        and not cut_from_teacher
    ):
        return ModelAsset(
            path=spec.name_or_path, tokenizer=spec.tokenizer or spec.name_or_path, dtype=spec.dtype
        )
    if spec.kind == "pruned":
        if role == "teacher" and spec.source == "teacher":
            raise gguf.ModelSourceError(
                "teacher.source: teacher names the teacher itself; name a model to cut"
            )
        source = _pretrained_asset("teacher", cfg, log) if spec.source == "teacher" else None
        path = source.path if source else gguf.resolve(spec.source, cache, f"{role}.source", log)
        cut = prune.ensure_pruned(
            path, source.tokenizer if source else path, spec.drop_layers, cache, role, log
        )
        return ModelAsset(path=str(cut), tokenizer=str(cut), dtype=spec.dtype)
    path = gguf.resolve(spec.name_or_path, cache, f"{role}.name_or_path", log)
    tokenizer = gguf.resolve(spec.tokenizer, cache, f"{role}.tokenizer", log) if spec.tokenizer else path
    return ModelAsset(path=path, tokenizer=tokenizer, dtype=spec.dtype)


def tokenizer_recipe(spec: TinyModel, cfg: Config) -> list:
    """What shapes a tiny model's tokenizer; its digest names the tokenizer's directory in the cache. Every
    character model shares one (the alphabet's); BPE models of one run share one per size, trained on the run's
    whole task section (not `sft_task`'s part), so a BPE student and a BPE teacher of one size agree on every id."""
    if spec.tokenizer == "char":
        return [
            ASSET_FORMAT,
            tasks.ADDITION_ALPHABET,
        ]  # as before BPE existed: the cached ones keep their names
    return [
        ASSET_FORMAT,
        tasks.ADDITION_ALPHABET,
        "bpe",
        spec.bpe_vocab_size,
        BPE_CORPUS,
        cfg.task.model_dump(),
    ]


def bpe_corpus(cfg: Config) -> list[str]:
    """The text a BPE tokenizer is trained on: BPE_CORPUS's training problems of the task, prompt then answer as
    the model reads them, so the merges are the numbers the model sees and writes."""
    stream = tasks.training_stream(cfg.task, seed=BPE_CORPUS["seed"])
    return [p.prompt + (p.answer or "") for p, _ in zip(stream, range(BPE_CORPUS["problems"]), strict=False)]


def build_tokenizer(spec: TinyModel, cfg: Config):
    """The tokenizer a tiny model of `spec` is built with (not cached: see `_tok_dir`)."""
    if spec.tokenizer == "char":
        return build_char_tokenizer()
    return build_bpe_tokenizer(bpe_corpus(cfg), spec.bpe_vocab_size, tasks.ADDITION_ALPHABET)


def _tok_dir(cfg: Config, spec: TinyModel) -> Path:
    """The cache directory of the tokenizer `spec` names (`tokenizer_recipe`), made on first call; called only by a
    build (a shipped model carries its tokenizer)."""
    kind = "" if spec.tokenizer == "char" else f"{spec.tokenizer}-"
    path = Path(cfg.run.cache_dir) / f"tokenizer-{kind}{_digest(tokenizer_recipe(spec, cfg))}"
    if not (path / "tokenizer.json").is_file():
        _atomic_dir(path, lambda tmp: build_tokenizer(spec, cfg).save_pretrained(tmp))
    return path


def _teacher_asset(cfg: Config, log, rebuild: bool) -> ModelAsset:
    if cfg.teacher.kind == "tiny_vlm":
        return _vlm_asset("teacher", cfg.teacher, cfg, log, rebuild)
    if cfg.teacher.kind != "tiny":
        return _pretrained_asset("teacher", cfg, log)
    Path(cfg.run.cache_dir).mkdir(parents=True, exist_ok=True)
    return _tiny_asset("teacher", cfg.teacher, cfg, log, rebuild)


def ensure_assets(cfg: Config, log=print, rebuild: bool = False) -> Assets:
    """Return where student and teacher live: shipped, cached, or built and cached on first use (`rebuild`:
    built again from their recipes into the cache, shipped or not). The teacher is `cfg.teacher`: pass
    `cfg.for_teacher(name)` for one of several teachers (or see `ensure_teacher_assets`); the run's config with
    a `teachers` section gives its first teacher (never the unused `teacher` section's default model)."""
    pools = cfg.teacher_pools()
    if cfg.teachers is not None and all(cfg.teacher != p.model for p in pools.values()):
        cfg = cfg.for_teacher(next(iter(pools)))
    # each model by its own kind: a tiny student may learn from a pretrained teacher of another tokenizer
    teacher = _teacher_asset(cfg, log, rebuild)
    return Assets(student=ensure_student_asset(cfg, log, rebuild), teacher=teacher)


def ensure_student_asset(cfg: Config, log=print, rebuild: bool = False) -> ModelAsset:
    """The student alone (`ensure_assets(cfg).student` without finding or building any teacher)."""
    if cfg.student.kind == "tiny_vlm":
        return _vlm_asset("student", cfg.student, cfg, log, rebuild)
    if cfg.student.kind != "tiny":
        return _pretrained_asset("student", cfg, log)
    Path(cfg.run.cache_dir).mkdir(parents=True, exist_ok=True)
    return _tiny_asset("student", cfg.student, cfg, log, rebuild)


def ensure_teacher_assets(cfg: Config, log=print, rebuild: bool = False) -> dict[str, ModelAsset]:
    """Every teacher pool's model by teacher name (`ensure_assets(cfg.for_teacher(name)).teacher`), each built
    at most once: pools with the same model share it (`rebuild` rebuilds it once)."""
    out: dict[str, ModelAsset] = {}
    done: dict[str, ModelAsset] = {}  # the model section's json -> its asset
    for name in cfg.teacher_pools():
        view = cfg.for_teacher(name)
        key = json.dumps(
            [view.teacher.model_dump(), view.scorer.teacher_is_local], sort_keys=True, default=str
        )
        if key not in done:
            done[key] = _teacher_asset(view, log, rebuild)
        out[name] = done[key]
    return out


def file_digests(model_dir: Path) -> dict[str, str]:
    """sha256 of every file of a built model, by name."""
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(Path(model_dir).iterdir())
        if f.is_file()
    }


def shipped_manifest() -> dict:
    path = SHIPPED / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def compare_with_shipped(asset: ModelAsset) -> str | None:
    """How a (re)built model compares with the shipped model of the same recipe; None when none is shipped."""
    entry = shipped_manifest().get(Path(asset.path).name)
    if entry is None:
        return None
    return "identical to" if file_digests(Path(asset.path)) == entry["files"] else "DIFFERENT from"


def ship(cfg: Config, log=print, rebuild: bool = True) -> None:
    """Copy `cfg`'s tiny models (rebuilt from their recipes; `rebuild=False`: as cached) into `opd/demo_models/`
    and record them in its manifest: each one's recipe, the recipe's sha256 and its files' sha256. For
    maintainers, via `opd prepare --rebuild --ship`. Every teacher of a `teachers` section ships, and tiny VLMs
    (kind tiny_vlm) as the text models do."""
    built = ("tiny", "tiny_vlm")
    teachers = ensure_teacher_assets(cfg, log=log, rebuild=rebuild)
    student = ensure_student_asset(cfg, log=log, rebuild=rebuild) if cfg.student.kind in built else None
    models = [("teacher", cfg.for_teacher(n).teacher, a) for n, a in teachers.items()]
    manifest = shipped_manifest()
    SHIPPED.mkdir(exist_ok=True)
    for role, spec, asset in [*models, ("student", cfg.student, student)]:
        if spec.kind not in built or asset is None:
            continue
        src = Path(asset.path)
        rec = model_recipe(role, spec, cfg)
        digests = file_digests(src)
        previous = manifest.get(src.name, {}).get("files")
        change = "new" if previous is None else "unchanged" if previous == digests else "CHANGED"
        if src.resolve() != (SHIPPED / src.name).resolve():  # not already the shipped copy itself
            shutil.rmtree(SHIPPED / src.name, ignore_errors=True)
            shutil.copytree(src, SHIPPED / src.name)
        manifest[src.name] = {
            "recipe": rec,
            "recipe_sha256": hashlib.sha256(
                json.dumps(rec, sort_keys=True, default=str).encode()
            ).hexdigest(),
            "build_threads": BUILD_THREADS,
            "eval_accuracy": asset.eval_accuracy,
            "files": digests,
        }
        log(f"shipped {src.name} in {SHIPPED} ({change})")
    (SHIPPED / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def load_asset(asset: ModelAsset, device: str = "cpu"):
    """The model and tokenizer, the model's real vocabulary kept on it (opd.models.loading.load_model). A tiny
    VLM's directory gives its LLaVA and its processor's tokenizer (the processor: opd.models.vlm.load_vlm)."""
    if vlm.is_vlm_dir(asset.path):
        model, processor = vlm.load_vlm(asset.path, device=device)
        return model, processor.tokenizer
    return load_model(asset.path, asset.tokenizer, asset.dtype, device)
