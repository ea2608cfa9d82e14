# Two commands on a fresh machine with only Python:  make demo  |  make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test venv test-venv soak bench docs reliability-report clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,peers]'
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed

test-venv: $(VENV)/.installed-test

## Harvest a local synthetic archive served on loopback into ./harvest-demo
demo: $(VENV)/.installed
	$(BIN)/harvester demo

## The whole test suite (what CI runs)
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

## Long chaos soak and kill -9 campaign (20 + 5 seeds); make soak SOAK_SEEDS=50 for more
SOAK_SEEDS ?= 20
KILL_SEEDS ?= 5
soak: $(VENV)/.installed-test
	HARVESTER_SOAK_SEEDS=$(SOAK_SEEDS) HARVESTER_KILL_SEEDS=$(KILL_SEEDS) $(BIN)/python -m pytest -q \
		tests/reliability/test_chaos_soak.py tests/reliability/test_crash_consistency.py

## Regenerate docs/reliability.md from a run of the reliability suite
reliability-report: $(VENV)/.installed-test
	$(BIN)/python -m tests.reliability.report

## Benchmarks against tcia_utils and nbiatoolkit on loopback: make bench SCENARIO=a (a-e, all)
SCENARIO ?= all
bench: $(VENV)/.installed-test
	$(BIN)/python bench/run.py $(SCENARIO) --json bench/out/results-$(SCENARIO).json

## API reference from the docstrings (pdoc), into docs/api/
docs: $(VENV)/.installed
	$(BIN)/pip install -q pdoc
	$(BIN)/pdoc -o docs/api harvester

clean:
	rm -rf $(VENV) harvest-demo .pytest_cache
