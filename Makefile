# The two commands of the README: `make run` and `make test`.
# Each creates .venv when missing and installs into it only when pyproject.toml changed,
# so a second run installs nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# FAST=1 skips the slow tests (image builds, browser, load); CI always runs everything.
PYTEST_FLAGS := $(if $(FAST),-m "not slow",)

.PHONY: run test lint clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(VENV)/bin/vitserve serve

# CI runs `make test`, so a lint or format finding fails it before any test runs.
test: lint
	$(PY) -m pytest $(PYTEST_FLAGS)

# Lint and format (ruff), types (mypy), the layer contracts (import-linter); settings in pyproject.toml.
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-logo

clean-venv:
	rm -rf $(VENV)

# The reliability tests at full size (CI runs them small): ~300 schemathesis cases per operation and
# mode, 3000 hypothesis examples per property, a 10,000-request soak, 30 s of overload; decoding
# bombs at the production 40 Mpx limit, 30,000 reads and a 4000-path job under symlink swaps, a
# 16 MiB manifest, a 128 MiB unterminated header, JSON of 6.9 M elements, 1000 idle connections.
# Figures and what each test proves: docs/RELIABILITY.md.
.PHONY: fuzz
fuzz: $(VENV)/.installed-test
	RELIABILITY_FUZZ_CASES=300 RELIABILITY_PROPERTY_EXAMPLES=3000 RELIABILITY_SOAK_REQUESTS=10000 \
	RELIABILITY_OVERLOAD_SECONDS=30 RELIABILITY_DECODE_LIMIT_PIXELS=40000000 RELIABILITY_SWAP_READS=30000 \
	RELIABILITY_SWAP_JOB_PATHS=4000 RELIABILITY_MANIFEST_BYTES=16777216 RELIABILITY_HEAD_BOMB_BYTES=134217728 \
	RELIABILITY_JSON_BOMB_ELEMENTS=6900000 RELIABILITY_IDLE_CONNECTIONS=1000 \
	$(PY) -m pytest tests/reliability -s -p no:cacheprovider
