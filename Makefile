# Two commands for a fresh machine: `make demo` and `make test`. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STATE ?= /tmp/invoker-demo

.PHONY: venv services down demo test test-unit lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

services: venv  ## Docker engine, Apache Kafka, pouchdb-server, images
	INVOKER_PYTHON=$(abspath $(PY)) deploy/services.sh up

down:
	deploy/services.sh down

lint: venv
	$(VENV)/bin/ruff check invoker store overflow tests bench

test-unit: venv
	$(PY) -m pytest -q tests/unit tests/test_actionproxy.py tests/test_store_sqlite.py

test: services lint
	$(PY) -m pytest -q -ra --durations=15 tests

demo: services
	INVOKER_PYTHON=$(abspath $(PY)) deploy/demo.sh

bench: services
	$(PY) -m bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
