# `make run` and `make test` each build .venv on first use; nothing else needs installing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m harness

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pytest -q tests/benchmarks --benchmark-enable

lint: $(STAMP)
	$(VENV)/bin/ruff check harness methods metrics tests
	$(VENV)/bin/ruff format --check harness methods metrics tests
	$(VENV)/bin/mypy harness methods metrics

clean:
	rm -rf $(VENV)
