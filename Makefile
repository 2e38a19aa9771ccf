# Fresh-machine entry points (Debian, Python 3.11, no GPU). Both create .venv and install what they need, idempotently.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast lint

# torch/torchvision are pinned to the builds that pip installs offline from this machine kind's wheel cache.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job: the whole DVC pipeline on the embedded digits data, then the comparison table. `dvc repro` copies new
# outputs into its cache; the relink leaves one copy of each (hard links; .dvc/config's cache.type).
run: setup
	. $(BIN)/activate && dvc repro && dvc checkout --relink -q dvc.yaml && cat outputs/report/report.md

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Every test, the end-to-end runs marked slow included (what CI runs).
test: lint
	$(BIN)/pytest -q -m 'slow or not slow'

# The inner loop: everything but the tests marked slow (what a plain `pytest` runs: pyproject.toml's addopts).
test-fast: lint
	$(BIN)/pytest -q
