# Set-up, run and test entry points. README.md's first two commands are `make run` and `make test`.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup system-deps run test unit-test cluster-test clean

# The virtualenv is rebuilt only when a requirements file changes.
setup: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-train.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

# What the simulated cluster needs from the OS (root only; skipped where already present).
system-deps:
	@scripts/install-system-deps

# The main job on the embedded default: this machine alone, no SSH, GPU if present else CPU.
run: setup
	$(VENV)/bin/fab launch

test: setup system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

unit-test: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

cluster-test: setup system-deps
	$(PY) -m pytest -m cluster $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
