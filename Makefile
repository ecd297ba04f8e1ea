# `make demo` and `make test` install what they need into ./.venv on first use (a stamp file
# keeps the second call from reinstalling; it is refreshed when requirements.lock or pyproject.toml change).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cached-transformers-installed

export OMP_NUM_THREADS ?= 2

.PHONY: install demo test test-fast bench clean-outputs

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -r requirements.lock
	$(BIN)/python -m pip install -e . --no-deps
	touch $(STAMP)

# Train the baseline and the cached PVT-Tiny on the stand-in data (NOT ImageNet) and compare them.
demo: $(STAMP)
	$(BIN)/python -m tasks.classification.demo

# All tests, slow ones included (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest -q

# Without the tests marked slow.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python scripts/benchmark.py

clean-outputs:
	rm -rf outputs multirun
