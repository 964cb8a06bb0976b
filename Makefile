# Every target sets up its own virtual environment on first use: `make run` and `make test` are
# the only commands a fresh machine (Python 3.11+) needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2
CONSTRAINTS ?=
PYTHON_FOR_JAX011 ?= python3.12

.PHONY: install run test test-slow test-gpu-versions lint bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) experiments/compare.py configs/quickstart.yaml

test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow"

# The default suite against the GPU machine's jax, flax, optax and chex (Python 3.12+).
test-gpu-versions:
	$(MAKE) test PYTHON=$(PYTHON_FOR_JAX011) VENV=.venv-gpu-versions CONSTRAINTS=constraints/gpu-machine.txt

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
	rm -rf $(VENV) .venv-gpu-versions .pytest_cache .ruff_cache .mypy_cache
