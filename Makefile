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

# No file prerequisite: the path already changes with the pins, and a fresh clone's newer file
# times must not rebuild a venv that is already complete.
$(VENV)/.stack-ready:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements/stack.txt
	touch $@

# Editable installs of core and every first-party plugin (no network: dependencies come from the
# stack). The cached venv may be shared by several checkouts, so it records which checkout (and
# which pyproject files) its editable installs point at, and reinstalls when that is not this one.
OWNER := $(CURDIR) $(shell cat pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS)) | sha256sum | cut -c1-16)

setup: $(VENV)/.stack-ready
	@if [ "$$(cat $(VENV)/.editable-owner 2>/dev/null)" != "$(OWNER)" ]; then \
		echo "installing peace-core and plugins (editable) into $(VENV)"; \
		$(VENV)/bin/pip install -q --no-deps --no-build-isolation $(addprefix -e ,$(PACKAGES)) && \
		echo "$(OWNER)" > $(VENV)/.editable-owner; \
	fi
	ln -sfn $(VENV) .venv

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	PEACE_STRICT_PLUGINS=1 $(PY) -m pytest -q

test-fast: setup
	PEACE_STRICT_PLUGINS=1 $(PY) -m pytest -q -m "not slow"

demo: setup
	$(VENV)/bin/peace demo --out demo-out

# The six standard workloads at the small and base sizes, each in a fresh process (about 15 min
# on 2 CPU cores); benchmarks/workloads.py --help for sizes, devices, dtypes and options.
bench: setup
	$(PY) benchmarks/workloads.py

clean:
	rm -rf .venv dist build .pytest_cache .ruff_cache
