# Thin targets: humans and .ci/run call the same ones.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEFAULT_MODEL ?= smollm2-135m

.PHONY: run test bench lint install model clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

model: install
	$(VENV)/bin/clawctl models pull $(DEFAULT_MODEL)

run: model
	$(VENV)/bin/clawd

test: model
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check clawctl tests bench
	$(VENV)/bin/ruff format --check clawctl tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: model
	$(PY) bench/foundation.py
	$(PY) bench/snapshots.py
	$(PY) bench/adapters.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dist build
