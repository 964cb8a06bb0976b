# Every target sets up its own virtual environment on first use: `make run` and `make test` are
# the only commands a fresh machine (Python 3.11+) needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2

.PHONY: install run test test-slow lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) experiments/compare.py configs/quickstart.yaml

test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow"

test-slow: install
	$(PY) -m pip install --quiet -e ".[static]"
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check src tests experiments benchmarks
	$(VENV)/bin/ruff format --check src tests experiments benchmarks
	$(VENV)/bin/mypy

bench: install
	$(PY) benchmarks/cpu_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
