# Two commands on a fresh machine: `make demo` and `make test`. Everything else is a step of those.
SHELL := /bin/bash
PYTHON ?= python3
STACK_HASH := $(shell cat requirements/stack.txt | sha256sum | cut -c1-16)
# The heavy stack (~7 GB) is cached outside the clone, keyed by the pinned requirements.
VENV ?= $(HOME)/.cache/peace/venv-$(STACK_HASH)
PY := $(VENV)/bin/python
PLUGINS := plugins/vision plugins/audio plugins/text
PACKAGES := . $(PLUGINS)

.PHONY: setup test test-fast lint demo bench clean

$(VENV)/.stack-ready: requirements/stack.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements/stack.txt
	touch $@

# Editable installs of core and every first-party plugin (no network: dependencies come from the stack).
.venv-stamp: $(VENV)/.stack-ready pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS))
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation $(addprefix -e ,$(PACKAGES))
	ln -sfn $(VENV) .venv
	touch $@

setup: .venv-stamp

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	PEACE_STRICT_PLUGINS=1 $(PY) -m pytest -q

test-fast: setup
	PEACE_STRICT_PLUGINS=1 $(PY) -m pytest -q -m "not slow"

demo: setup
	$(VENV)/bin/peace demo

bench: setup
	$(PY) benchmarks/attention.py

clean:
	rm -rf .venv .venv-stamp dist build .pytest_cache .ruff_cache
