# The commands of the README:  `make demo`,  `make test`  (the full suite, what CI runs) and
# `make test-fast`  (the suite without the tests marked slow: a reviewer's loop).
# Each creates .venv (Python >= 3.11) and installs the project on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast
install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

demo: install
	$(PY) -m mobilemoe_jax.pipeline --workdir=runs/demo

test: install
	$(PY) -m pytest -n 2 --dist loadfile

test-fast: install
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow"
