# The two README commands: `make demo` and `make test`. Both set up from nothing: a .venv at the root,
# the CPU torch 2.13.0 that lies on this machine's disk, then the pinned stack (constraints.txt).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DATA ?= ../shared/data

.PHONY: setup test test-fast demo lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,semantic]"
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/ruff check nextlocmoe train export tests
	NEXTLOCMOE_DATA=$(DATA) $(BIN)/python -m pytest -q --durations=15 tests

test-fast: setup
	$(BIN)/python -m pytest -q tests/unit

demo: setup
	NEXTLOCMOE_DATA=$(DATA) bash scripts/demo.sh

lint: setup
	$(BIN)/ruff check nextlocmoe train export tests
	$(BIN)/ruff format --check nextlocmoe train export tests

clean:
	rm -rf demo-out .pytest_cache
