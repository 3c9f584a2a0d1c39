# Quick start: `make demo` (venv + real model + quickstart recipe), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hf_sparse-installed

.PHONY: venv demo test test-fast lint bench bench-peer clean

venv: $(STAMP)

# torch first, pinned to the CPU build this machine ships, so no CUDA build is downloaded.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/hf-sparse fetch-model smollm2-135m
	$(VENV)/bin/hf-sparse --threads 2 run recipes/quickstart.yaml --overwrite

test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not real_model and not distributed and not slow"

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: venv
	$(PY) benchmarks/prune_smollm2.py

bench-peer: venv
	bash benchmarks/setup_llmcompressor_venv.sh
	$(PY) benchmarks/prune_smollm2.py --peer

clean:
	rm -rf $(VENV) build dist *.egg-info outputs
