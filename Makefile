# `make demo` and `make test` each create .venv/ if it is missing and install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP    := $(VENV)/.test-installed

.PHONY: demo test lint format bench clean-demo

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip

$(RUNTIME_STAMP): requirements.txt | $(VENV)/bin/python
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

$(TEST_STAMP): requirements.txt requirements-test.txt | $(VENV)/bin/python
	$(VENV)/bin/pip install -q -r requirements-test.txt
	touch $(RUNTIME_STAMP) $@

# Everything on TensorFlow (the default backend), then the backend-agnostic tests again on JAX
# and on PyTorch.
test: $(TEST_STAMP)
	$(PY) -m pytest -q -rs tests
	KERAS_BACKEND=jax $(PY) -m pytest -q -rs -m multibackend tests
	KERAS_BACKEND=torch $(PY) -m pytest -q -rs -m multibackend tests

# ruff, settings in pyproject.toml: the lint rules and the formatter, both only checked here.
lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Apply the formatter and the safe lint fixes.
format: $(TEST_STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

DEMO_DIR := demo_output
demo: $(RUNTIME_STAMP)
	bash datasets/demo.sh $(DEMO_DIR)

# The quick benchmarks; bench_transfer.py (under two hours on 2 cores) runs alone: see docs/benchmarks.md.
bench: $(TEST_STAMP)
	for b in benchmarks/bench_*.py; do \
	  [ "$$b" = benchmarks/bench_transfer.py ] || $(PY) $$b || exit 1; done

clean-demo:
	rm -rf $(DEMO_DIR)
