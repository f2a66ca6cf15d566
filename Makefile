# Two commands do everything on a fresh machine: `make test` and `make demo` (each creates .venv first).
# TORCH picks the torch build: the default is the CPU wheel that installs fast here; on a GPU machine use
# e.g. `make demo TORCH=torch` (or any torch>=2.3 already in a venv you point VENV at).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: venv test test-fast lint demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# --max-worker-restart 0: a worker that dies (OOM, a signal) ends the run at once with the test it was running
# named; pytest-xdist 3.8 replaces a crashed worker under --dist loadgroup and can then wait forever (xdist
# issues 1323, 1327, 1378), which once held CI for its whole 90 minutes
test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --max-worker-restart 0 $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

# ruff (in the test extra) with the settings of pyproject.toml's [tool.ruff]
lint: venv
	$(BIN)/ruff check opd_dynamics tests benchmarks

demo: venv
	$(BIN)/opd-dynamics demo --out demo-out --overwrite

bench: venv
	$(BIN)/python benchmarks/bench_io.py
	$(BIN)/python benchmarks/bench_analysis.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
