# mmpt: two commands on a fresh machine -> `make demo`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PIP_QUIET := --quiet --disable-pip-version-check
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# The local package mirror prints one harmless warning per package; hide those lines only.
HIDE_MIRROR_NOISE := grep -v "is ignored: it is neither" || true

.PHONY: install demo test test-all lint format bench clean docs

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install $(PIP_QUIET) -e ".[dev,video]" 2>&1 | { $(HIDE_MIRROR_NOISE); }
	$(PY) -c "import mmpt, mmpt.models, mmpt.datamodules, torch, torchvision, open_clip, webdataset, decord, av"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmpt fit -c configs/quickstart/vila_stage1.yaml

# Tests run in TEST_WORKERS processes (pytest-xdist; CI has 2 cores); TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
TEST_ARGS := -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal)

test: $(STAMP)
	$(PY) -m pytest $(TEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(TEST_ARGS) -m "" 

# The documentation site (MkDocs Material + mkdocstrings), offline, into site/.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict
	@echo "open site/index.html"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) scripts/bench_dataloader.py

clean:
	rm -rf $(VENV) runs data .pytest_cache .ruff_cache site .cache
