# Commands for a fresh machine: `make demo`, `make test`, `make images`, `make test-compose`.
# See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv services down demo test test-unit lint bench images test-compose clean

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
	$(PY) -m pytest -q -ra --durations=15 tests --ignore=tests/compose

images: venv  ## every image of the compose stack, built with no registry (deploy/compose/images.sh)
	deploy/docker-engine.sh up
	INVOKER_PYTHON=$(abspath $(PY)) deploy/compose/images.sh build

# The compose stack under load (tests/compose); the stack is torn down, volumes included,
# whatever the outcome (the tests do it; the second down covers an interrupted pytest).
test-compose: images lint
	status=0; $(PY) -m pytest -q -ra --durations=10 tests/compose || status=$$?; \
	COMPOSE_PROJECT_NAME=invoker-test deploy/compose/compose.sh down --volumes --remove-orphans \
		>/dev/null 2>&1 || true; \
	exit $$status

demo: services
	INVOKER_PYTHON=$(abspath $(PY)) deploy/demo.sh

bench: services
	$(PY) -m bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
