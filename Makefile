# Two entry points for a fresh machine: `make demo` and `make test`. Each sets up .venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bilevel_maml-installed
DATA ?= ../shared/data/omniglot-small

.PHONY: demo test test-slow test-docs docs setup clean

$(STAMP): setup.cfg pyproject.toml tools/bootstrap.sh
	VENV=$(VENV) bash tools/bootstrap.sh

setup: $(STAMP)

# A few minutes of MAML on the real Omniglot subsets: progress bar, checkpoints and an offline
# W&B run in runs/demo-<time>/, then held-out 5-way 1-shot accuracy with its 95% CI, and the
# learning curves drawn to runs/demo-<time>/curves.png.
DEMO_RUN := runs/demo-$(shell date +%Y%m%d-%H%M%S)
demo: $(STAMP)
	$(VENV)/bin/bilevel-maml train --algorithm maml --dataset omniglot-small --data-root $(DATA) \
		--ways 5 --shots 1 --inner-steps 1 --inner-lr 0.4 --meta-batch-size 8 --iterations 500 \
		--valid-every 100 --checkpoint-every 100 --test-tasks 600 --wandb offline --output $(DEMO_RUN)
	$(VENV)/bin/bilevel-maml plot --output $(DEMO_RUN)

test: $(STAMP)
	$(PY) -m pytest -q

# Long training runs and scripts run end to end (torchrun, benchmarks, examples): CI runs them too.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Every README/docs code block run as written (small budget), the site built and checked.
test-docs: $(STAMP)
	$(PY) -m pytest -q -m docs

# The documentation site (Sphinx + MyST): docs/_build/html/index.html. Warnings are errors.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs built: docs/_build/html/index.html"

clean:
	rm -rf $(VENV) .pytest_cache docs/_build docs/_generated
