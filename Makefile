# One command sets up and runs the gateway, one sets up and runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: run test lint typecheck pytest bench bench-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/tiktok-gateway serve

lint: $(STAMP)
	$(BIN)/ruff check gateway tests deploy bench
	$(BIN)/hadolint Dockerfile

typecheck: $(STAMP)
	$(BIN)/mypy

# What the tests need that pip cannot install: Debian's prometheus and promtool, for
# tests/test_prometheus.py, and Debian's chromium, for tests/test_browser_chromium.py
# (driven by Playwright's Python package; no browser is ever downloaded). Installed when
# missing where we are root with apt-get; elsewhere a note (the tests then skip, and
# fail under CI=true).
.PHONY: tools
tools:
	@bash scripts/ensure-debian-package.sh prometheus prometheus promtool
	@bash scripts/ensure-debian-package.sh chromium chromium

pytest: $(STAMP) tools
	$(BIN)/pytest

test: lint typecheck pytest

# A deep schemathesis run against a live gateway (tests/test_fuzz.py; `make test` runs a
# bounded one). FUZZ_MAX_EXAMPLES per operation and phase; FUZZ_SEED=<seed> replays a run.
.PHONY: fuzz
fuzz: $(STAMP)
	FUZZ_MAX_EXAMPLES=$${FUZZ_MAX_EXAMPLES:-500} $(BIN)/pytest -q tests/test_fuzz.py

# The chaos soak (tests/test_chaos_soak.py; `make test` runs it for 30 seconds): the same
# test for SOAK_SECONDS (default 200, about 4 minutes in all). SOAK_SEED=<seed> replays one.
.PHONY: soak
soak: $(STAMP)
	SOAK_SECONDS=$${SOAK_SECONDS:-200} $(BIN)/pytest -q -s tests/test_chaos_soak.py

# The cluster failover test (tests/test_failover.py; `make test` kills one primary per
# variant) for FAILOVER_SOAK_SECONDS (default 300), killing a primary every few seconds.
.PHONY: soak-failover
soak-failover: $(STAMP)
	FAILOVER_SOAK_SECONDS=$${FAILOVER_SOAK_SECONDS:-300} $(BIN)/pytest -q -s tests/test_failover.py

# The benchmark against B0 (bench/, docs/benchmarks.md): under 12 minutes, not part of
# `make test`. Writes bench/results/<date>.json and regenerates docs/benchmarks.md.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run

bench-smoke: $(STAMP)
	$(BIN)/python -m bench.run --smoke

clean:
	rm -rf $(VENV) .gateway .mypy_cache .pytest_cache .ruff_cache
