.PHONY: setup test lint demo
setup:  ## install opd-stream and its test tools (torch pinned to 2.13.0)
	python3 -m pip install -e ".[dev]"
test:   ## the README's test command (CI runs this)
	python3 -m pytest
lint:
	ruff check . && ruff format --check .
demo:
	opd run configs/tiny.yaml
