# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install test lint format docs demo clean

$(INSTALLED): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,redis,postgres]'
	@touch $@

install: $(INSTALLED)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The docs site from docs/ into site/; any warning (a broken link or #anchor) fails the build.
# Offline: the theme loads no web fonts. NO_MKDOCS_2_WARNING quiets the theme's banner. Not
# --quiet: it hides the warnings from --strict too, and the build then passes with them.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The suite on every CPU (pytest-xdist): its tests mostly wait, on the processes they start, on
# servers and on leases, so workers side by side take about half the time. PYTEST_WORKERS=0:
# one process, as a bare `pytest` runs.
PYTEST_WORKERS ?= auto
test: lint docs
	$(BIN)/pytest --numprocesses $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

demo: install
	@$(BIN)/python example_project/demo.py

# Round trips, then benchmarks against raw locks and the peers, then the targets: 3 to 6 minutes;
# BENCH_ARGS=--quick for a smoke run.
.PHONY: bench
bench: install
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r benchmarks/requirements.txt
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache example_project/.locks site dist

# The supported range beyond the default interpreter: Django 4.2 LTS on the oldest Python, and
# the newest Django where Python >= 3.12 is present. Interpreters that are missing are skipped.
COMPAT_TESTS := tests/test_conformance.py tests/test_command.py tests/test_settings.py \
	tests/test_admin.py tests/test_locks_status.py tests/test_prometheus.py \
	tests/test_file_backend.py tests/test_errors.py

.PHONY: compat
compat:
	@bash .ci/compat "3.10" "django>=4.2,<5" .venv-django42 $(COMPAT_TESTS)
	@bash .ci/compat "3.13 3.12" "django>=6" .venv-django6 $(COMPAT_TESTS)

# The reliability gauntlet at full size, per strategy: 16 processes x 500 acquisitions, 50 crash
# rounds, 16 x 200 of a max_holders=3 semaphore and of shared/exclusive holds, and writer
# starvation (STRESS_ARGS / CRASH_ARGS / HOLDER_ARGS scale them); make test runs small versions.
STRESS_ARGS ?= --workers 16 --acquisitions 500
HOLDER_ARGS ?= --workers 16 --acquisitions 200
CRASH_ARGS ?= --rounds 50

.PHONY: stress
stress: install
	$(BIN)/python -m tests.stress stress $(STRESS_ARGS)
	$(BIN)/python -m tests.stress crash $(CRASH_ARGS)
	$(BIN)/python -m tests.stress semaphore $(HOLDER_ARGS)
	$(BIN)/python -m tests.stress shared $(HOLDER_ARGS)
	$(BIN)/python -m tests.stress starvation
