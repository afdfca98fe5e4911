# minibert: one target per thing to do. Every target sets up what it needs first.
#   make baseline            the paper's experiment 2 (EPOCHS=, MODEL=, SEED=, DEVICE= override)
#   make test                the test suite

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= 2.13.0
MODEL  ?= auto
EPOCHS ?= 10
SEED   ?= 0
DEVICE ?= auto

.PHONY: install weights data test reference

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==$(TORCH)
	$(PY) -m pip install -e '.[test]'
	touch $@

weights: install
	$(PY) -m minibert.weights $(MODEL)

data: install
	$(PY) -m minibert.data

test: install
	$(PY) -m minibert.weights all-MiniLM-L6-v2
	$(PY) -m minibert.data || echo "MASSIVE not in place: the tests that need it are skipped"
	$(PY) -m pytest

reference: install
	$(PY) -m pip install -e '.[reference]'
	$(PY) -m minibert.weights all-MiniLM-L6-v2
	$(PY) tests/make_reference.py

# ---- the paper's experiments ------------------------------------------------------------------
RUN = $(PY) train.py --model $(MODEL) --epochs $(EPOCHS) --seed $(SEED) --device $(DEVICE) --resume

.PHONY: zeroshot baseline
zeroshot: install data
	$(PY) evaluate.py --zero-shot --model $(MODEL) --seed $(SEED)

baseline: install data
	$(RUN) --experiment baseline
