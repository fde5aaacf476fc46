# One command sets up and runs the gateway, one sets up and runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/tiktok-gateway serve

lint: $(STAMP)
	$(BIN)/ruff check gateway tests deploy
	$(BIN)/hadolint Dockerfile

typecheck: $(STAMP)
	$(BIN)/mypy

# What the tests need that pip cannot install: Debian's prometheus and promtool, for
# tests/test_prometheus.py. Installed when missing where we are root with apt-get;
# elsewhere a note (the test then skips, and fails under CI=true).
.PHONY: tools
tools:
	@bash scripts/ensure-prometheus.sh

pytest: $(STAMP) tools
	$(BIN)/pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .gateway .mypy_cache .pytest_cache .ruff_cache
