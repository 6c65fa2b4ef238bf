# The two set-up commands of the README: `make run` and `make test`.
# Each creates (or reuses) .venv, installs torch==2.13.0 first (a CPU build on the team's
# machines; an unpinned torch would pull a multi-GB CUDA build), then melo-dist itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data/synthetic

.PHONY: install run test lint bench-prepare clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: install
	$(BIN)/melo-dist prepare --source synthetic --out $(DATA) --test-users 400 --overwrite

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench-prepare: install
	$(BIN)/melo-dist bench prepare

clean:
	rm -rf $(VENV) data/synthetic
