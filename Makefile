# `make demo`: set up .venv, run the main job (D3PO) on the embedded tiny RANDOM checkpoint, edit with it.
# `make test`: set up .venv and run the test suite (what CI runs); `make test-slow` adds the learning tests.
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

.PHONY: setup demo test test-slow bench
setup: $(VENV)/.installed

DEMO := outputs/d3po_snow_tiny
demo: setup
	$(PY) -m jaxedit.train --config=configs/d3po_snow.py:tiny --config.workdir=$(DEMO)
	$(PY) -m jaxedit.sample --checkpoint=$(DEMO)/model --image=$(DEMO)/data/images --out=$(DEMO)/edited \
		--instruction="add snow on the road" --style=$(DEMO)/data/styles/snow/snow_00.png --steps=20
	@echo "trained model: $(DEMO)/model  edits: $(DEMO)/edited  (RANDOM weights: the edits are noise)"

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# + the learning tests and grain worker processes (~10 more minutes on 2 cores)
test-slow: setup
	JAXEDIT_SLOW_TESTS=1 $(PY) -m pytest -q -n 2 --dist loadfile tests

bench: setup
	$(PY) bench/unet_forward.py
