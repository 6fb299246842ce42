# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install test lint format demo clean

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

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

demo: install
	@$(BIN)/python example_project/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache example_project/.locks

# The supported range beyond the default interpreter: Django 4.2 LTS on the oldest Python, and
# the newest Django where Python >= 3.12 is present. Interpreters that are missing are skipped.
COMPAT_TESTS := tests/test_conformance.py tests/test_command.py tests/test_settings.py \
	tests/test_file_backend.py tests/test_errors.py

.PHONY: compat
compat:
	@bash .ci/compat "3.10" "django>=4.2,<5" .venv-django42 $(COMPAT_TESTS)
	@bash .ci/compat "3.13 3.12" "django>=6" .venv-django6 $(COMPAT_TESTS)
