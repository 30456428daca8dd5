# `make run` and `make test` each build .venv on first use; nothing else needs installing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench bench-check bench-baseline lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps lxt==2.1
	$(PY) -m metrics.compile
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m harness

test: $(STAMP)
	$(PY) -m pytest -q

# Benchmarks (never part of `make test`). A baseline per machine lives in results/benchmarks/<machine>/;
# `make bench` compares with it, `make bench-check` fails when a median is over 15% slower, and
# `make bench-baseline` saves a new one (commit it).
BENCH_DIR = results/benchmarks/$(shell $(PY) -c "from harness.runtime import machine_id; print(machine_id())")
BENCH = $(PY) -m pytest -q tests/benchmarks --benchmark-enable --benchmark-storage=file://$(BENCH_DIR) \
	--benchmark-columns=min,median,iqr,rounds --benchmark-sort=name
BASELINE = $(firstword $(subst _, ,$(notdir $(lastword $(wildcard $(BENCH_DIR)/*/*_baseline.json)))))

bench: $(STAMP)
	$(BENCH) $(if $(BASELINE),--benchmark-compare=$(BASELINE),)

bench-check: $(STAMP)
	@test -n "$(BASELINE)" || (echo "no baseline in $(BENCH_DIR): run make bench-baseline first" >&2; exit 1)
	$(BENCH) --benchmark-compare=$(BASELINE) --benchmark-compare-fail=median:15%

bench-baseline: $(STAMP)
	$(BENCH) --benchmark-save=baseline

lint: $(STAMP)
	$(VENV)/bin/ruff check harness methods metrics hydra_plugins tests
	$(VENV)/bin/ruff format --check harness methods metrics hydra_plugins tests
	$(VENV)/bin/mypy harness methods metrics hydra_plugins

clean:
	rm -rf $(VENV)
