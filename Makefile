# Two commands on a fresh machine: `make demo` and `make test`.
# Both install into .venv from the committed uv.lock only (`uv sync --locked`:
# exact versions and hashes; it fails instead of resolving anew when the lock
# does not match pyproject.toml). A second run installs nothing (stamp file).
# Change dependencies in pyproject.toml, then `make lock`, and commit both.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TOOLS   := .venv-tools
UV      := $(TOOLS)/bin/uv
STAMP   := $(VENV)/.dheads-installed

# uv must use this machine's Python (no downloads) and put the project in .venv.
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(CURDIR)/$(VENV)

.PHONY: install lock lock-check test test-fast demo bench clean-venv

install: $(STAMP)

$(UV): scripts/uv-requirements.txt
	@test -x $(TOOLS)/bin/python || $(PY) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q --disable-pip-version-check --require-hashes \
		-r scripts/uv-requirements.txt
	@touch $(UV)

$(STAMP): pyproject.toml uv.lock $(UV)
	$(UV) sync --locked --extra dev --python $(PY)
	@touch $(STAMP)

# Re-resolve pyproject.toml into uv.lock (the only way dependencies change).
lock: $(UV)
	$(UV) lock --python $(PY)

# Fails when uv.lock does not match pyproject.toml.
lock-check: $(UV)
	$(UV) lock --check --python $(PY)

test: lock-check install
	@bash scripts/install_chromium.sh   # the HTML report is checked in headless Chromium
	@bash scripts/install_postgres.sh   # the job store is tested against a real PostgreSQL server
	$(BIN)/python -m pytest tests -q --durations=15

# The fast tier for iterating: no Serve, no extra Ray clusters, no training
# runs or benchmark smokes (tests/conftest.py::SLOW names what it leaves out).
test-fast: install
	@bash scripts/install_chromium.sh
	$(BIN)/python -m pytest tests -q -m "not slow" --durations=10

demo: install
	$(BIN)/python scripts/demo.py

bench: install
	$(BIN)/python bench/model.py --threads 1
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/dub.py

clean-venv:
	rm -rf $(VENV) $(TOOLS)
