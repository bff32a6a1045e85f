# The two commands of the README: `make demo` (main job) and `make test` (test suite).
# Each creates or reuses .venv and installs what it needs; a stamp file skips reinstalling
# until setup.cfg changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: demo test install clean-venv

$(VENV)/.stamp-%: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[$*]"
	touch $@

install: $(VENV)/.stamp-test

demo: $(VENV)/.stamp-test
	$(PY) scripts/run_all.py $(ARGS)

test: $(VENV)/.stamp-test
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder $(ARGS)

clean-venv:
	rm -rf $(VENV)
