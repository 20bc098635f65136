# `make demo`: set up .venv and run the main job on the embedded tiny checkpoint.
# `make test`: set up .venv and run the test suite (what CI runs).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip check
	touch $@

.PHONY: setup demo test bench
setup: $(VENV)/.installed

demo: setup
	$(PY) -m jaxedit.demo --out=outputs/demo

test: setup
	$(PY) -m pytest -q -n 2 tests

bench: setup
	$(PY) bench/unet_forward.py
