# Two entry points (see README.md); each sets up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup compare test explore lint docs docs-gen study bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-dev.txt "torch==2.13.0"
	$(PY) -m pip install -q -c constraints-dev.txt -e ".[dev,docs]"
	touch $@

compare: setup
	$(VENV)/bin/predictopt compare

test: setup
	$(PY) -m pytest -q

# Fresh random hypothesis examples, PREDICTOPT_EXPLORE times as many (tests/conftest.py).
explore: setup
	HYPOTHESIS_PROFILE=explore PREDICTOPT_EXPLORE=$${PREDICTOPT_EXPLORE:-10} $(PY) -m pytest -q \
		tests/test_rules_properties.py tests/test_staleness.py tests/test_lr_scheduler.py \
		tests/test_simulator.py tests/test_spike.py tests/test_schedule_aware.py

lint: setup
	$(VENV)/bin/ruff check .

docs: setup
	$(VENV)/bin/mkdocs build --strict --site-dir site

# Rewrite the generated sections of docs/ (tables and plots) from the committed result files.
docs-gen: setup
	$(PY) tools/gen_docs.py

# The convergence study of docs/study.md (hours on 2 cores; resumes from docs/results/).
study: setup
	$(PY) -m predictopt.study_grid
	$(PY) tools/gen_docs.py

bench: setup
	$(PY) -m benchmarks.run_all
