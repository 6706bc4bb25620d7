# The two commands: `make demo` (the main job) and `make test`. Both build the environment first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup test demo lint format benchmark

setup:
	@VENV="$(VENV)" bash scripts/setup_env.sh

test: setup
	$(PYTHON) -m pytest -q tests $(PYTEST_ARGS)

demo: setup
	$(PYTHON) -m grounding_dino.demo_job $(DEMO_ARGS)

benchmark: setup
	$(PYTHON) -m grounding_dino.benchmark $(BENCHMARK_ARGS)

lint: setup
	$(PYTHON) -m black --check projects tests configs train_net.py demo
	$(PYTHON) -m ruff check projects tests configs train_net.py demo

format: setup
	$(PYTHON) -m black projects tests configs train_net.py demo
