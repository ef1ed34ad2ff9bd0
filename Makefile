# The README's commands. `make demo` sets up .venv and runs the main job; `make test` runs the tests.
VENV ?= .venv
PY := $(CURDIR)/$(VENV)/bin/python
DATASET ?= breastmnist
PROFILE ?= quick
PORT ?= 5000
EXPORT ?=
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: setup demo test test-fast ui bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	mlflow run . -e study -P dataset=$(DATASET) -P profile=$(PROFILE) -P export_results=$(EXPORT) --env-manager local --experiment-name $(DATASET)

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -n auto

test-fast: setup
	$(PY) -m pytest -n auto -m "not slow"

bench: setup
	$(PY) bench/augment_bench.py
	$(PY) bench/perf.py --dataset $(DATASET)

ui: setup
	MLFLOW_TRACKING_URI=sqlite:///mlflow.db $(PY) -m entrypoints.runs address --dataset $(DATASET) --url http://127.0.0.1:$(PORT)
	mlflow ui --backend-store-uri sqlite:///mlflow.db --port $(PORT)

# Generated reports and caches only: the tracking store (mlflow.db, mlruns/) and exported results
# hold what you logged and annotated; move them aside yourself for a fresh start.
clean:
	rm -rf reports .pytest_cache
