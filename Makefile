# The two commands: `make demo` (the main job) and `make test`. Both build the environment first.
# Applications live in tools/ (detectron2's layout); the library is the `grounding_dino` package.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup test-deps test demo lint format benchmark

setup:
	@VENV="$(VENV)" bash scripts/setup_env.sh

# System packages the tests need beyond the environment (Debian's chromium and chromium-driver
# for tests/test_web_demo.py); installs them with apt-get as root or through sudo, else says how.
test-deps:
	@bash scripts/setup_test_deps.sh

test: setup test-deps
	$(PYTHON) -m pytest -q tests $(PYTEST_ARGS)

demo: setup
	$(PYTHON) tools/demo_job.py $(DEMO_ARGS)

benchmark: setup
	$(PYTHON) tools/benchmark.py $(BENCHMARK_ARGS)

lint: setup
	$(PYTHON) -m black --check projects tests tools train_net.py demo
	$(PYTHON) -m ruff check projects tests tools train_net.py demo

format: setup
	$(PYTHON) -m black projects tests tools train_net.py demo
