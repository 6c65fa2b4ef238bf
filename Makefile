# The two set-up commands of the README: `make run` and `make test`.
# Each creates (or reuses) .venv, installs torch==2.13.0 first (a CPU build on the team's
# machines; an unpinned torch would pull a multi-GB CUDA build), then melo-dist itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data/synthetic

.PHONY: install run test lint clean results tables

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The main job: prepare the embedded synthetic default, meta-train MELO and MAML briefly with
# local Ray and 2 workers, score both (and the reference points) on the test users, and write
# the report of the two runs (reports/synthetic/report.md and .html).
run: install
	$(BIN)/melo-dist prepare --source synthetic --out $(DATA) --protocol melo --test-users 400 --overwrite
	@rm -rf runs/synthetic-melo runs/synthetic-maml
	$(BIN)/melo-dist train --config configs/synthetic.yaml --workers 2 --set data.path=$(DATA) \
		--set meta.regime=melo --set run.out=runs/synthetic-melo
	$(BIN)/melo-dist train --config configs/synthetic.yaml --workers 2 --set data.path=$(DATA) \
		--set meta.regime=maml --set run.out=runs/synthetic-maml
	$(BIN)/melo-dist evaluate --checkpoint runs/synthetic-melo --checkpoint runs/synthetic-maml \
		--split test
	$(BIN)/melo-dist report runs/synthetic-melo runs/synthetic-maml --out reports/synthetic

# `ray job submit` against a real local head first (its own temp dir, free ports, token auth;
# it stops only its own processes),
# then the test suite with its own session-wide Ray instance.
test: install
	bash scripts/job_submit_smoke.sh
	$(BIN)/python -m pytest -q

# Every table of results/ from a clean checkout: each plan trains what has no record of this
# code (each prints its expected duration first; hours on 2 cores), then writes its tables.
# `make tables` rewrites them from the committed records without training.
results: install
	for plan in results/plans/*.yaml; do $(BIN)/python results/study.py $$plan || exit 1; done

tables: install
	for plan in results/plans/*.yaml; do \
		$(BIN)/python results/study.py $$plan --tables-only || exit 1; done

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) data/synthetic runs/synthetic-melo runs/synthetic-maml
