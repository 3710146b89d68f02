"""opd-stream core: config, wire protocol, CLI and launchers."""

import os

# Component logs are read by people and tests; per-file download/loading progress bars only add noise.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
