# Conveyor: `make run` brings the platform up, `make test` proves it works.
# Only python3 (>= 3.11), make and a C compiler are needed; everything else is installed here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.synced

.PHONY: run test test-chaos lint format clean install bench soak docs docs-serve docs-reference

install: $(STAMP)

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv>=0.13"

$(STAMP): $(BIN)/uv pyproject.toml uv.lock
	UV_PROJECT_ENVIRONMENT=$(VENV) $(BIN)/uv sync --frozen --quiet
	@touch $@

run: $(STAMP)
	$(BIN)/python -m devtools.devstack run

test: $(STAMP)
	$(BIN)/python -m pytest --cov --cov-report=term $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov site

# The documentation site (docs/, mkdocs.yml) into site/, offline (no web fonts, no CDN) and
# --strict: a broken link or a stale generated reference page fails the build.
docs: $(STAMP)
	$(BIN)/python -m devtools.docs_reference --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The site at http://127.0.0.1:8001, rebuilt on every change.
docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8001

# Rewrite docs/reference/ from the code (settings, CLI, metrics, permissions, errors, HTTP API).
docs-reference: $(STAMP)
	$(BIN)/python -m devtools.docs_reference

# Conveyor against the bare Flask + Celery stack (bench/README.md): 5 rounds, then the growth
# curves, in under 15 minutes on a 2-core machine; e.g. BENCH_ARGS="--rounds 2 --skip-growth".
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Conveyor as deployed under 80% of the bench's end-to-end rate (bench/README.md); 5 minutes
# by default, e.g. `make soak SOAK_ARGS="--minutes 1"`. Exits non-zero if a check fails.
soak: $(STAMP)
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

# The chaos suite: real processes killed and restarted; prints one summary line per scenario.
test-chaos: $(STAMP)
	$(BIN)/python -m pytest tests/chaos -m chaos -s -p no:randomly --no-cov $(PYTEST_ARGS)
