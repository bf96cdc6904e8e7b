# Two commands on a fresh machine: `make demo` and `make test`.
# Both create/update .venv; a second run installs nothing (stamp file).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.dheads-installed

.PHONY: install test test-fast demo bench clean-runs

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

test: install
	@bash scripts/install_chromium.sh   # the HTML report is checked in headless Chromium
	$(BIN)/python -m pytest tests -q

demo: install
	$(BIN)/python -m dheads.jobs.demo

bench: install
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/dub.py
