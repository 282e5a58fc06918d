# Two entry points: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
SA20_VENV ?= .venv-sa20
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-sa20 compat compat-sa20 lint bench dashboards docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[demo,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pool-monitor demo $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The core module against SQLAlchemy 2.0.x (the default venv gets the newest 2.x).
$(SA20_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SA20_VENV)
	$(SA20_VENV)/bin/pip install --quiet --upgrade pip
	$(SA20_VENV)/bin/pip install --quiet -e ".[demo,dev]" "sqlalchemy>=2.0.30,<2.1" \
		"opentelemetry-instrumentation-sqlalchemy>=0.47b0,<1"
	touch $(SA20_VENV)/.installed

test-sa20: $(SA20_VENV)/.installed
	$(SA20_VENV)/bin/python -c "import sqlalchemy; print('SQLAlchemy', sqlalchemy.__version__)"
	$(SA20_VENV)/bin/python -m pytest -m core $(PYTEST_ARGS)

# SQLAlchemy's own test suite, bare and with every engine instrumented: instrumenting
# must change no test's outcome (compat/run.py). COMPAT_ARGS="--backends sqlite" etc.
compat: $(STAMP)
	$(BIN)/python -m compat.run --keep-going $(COMPAT_ARGS)

compat-sa20: $(SA20_VENV)/.installed
	$(SA20_VENV)/bin/python -m compat.run --keep-going $(COMPAT_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Regenerate the committed dashboards/rules and the Helm chart's copies of them.
dashboards: $(STAMP)
	$(BIN)/python -m dashboards
	$(BIN)/python helm/sync_files.py

# Regenerate docs/metrics.md and docs/settings.md from the code (tests/test_docs.py checks them).
docs: $(STAMP)
	$(BIN)/python docs/generate.py

bench: $(STAMP)
	$(BIN)/pool-monitor bench $(ARGS)

clean:
	rm -rf $(VENV) $(SA20_VENV) demo-report .pytest_cache .ruff_cache .compat-cache
