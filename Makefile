# Two entry points for a fresh machine: `make demo` and `make test`. Each sets up .venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bilevel_maml-installed
DATA ?= ../shared/data/omniglot-small

.PHONY: demo test test-slow setup clean

$(STAMP): setup.cfg pyproject.toml tools/bootstrap.sh
	VENV=$(VENV) bash tools/bootstrap.sh

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/omniglot.py --data-root $(DATA)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache
