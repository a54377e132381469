# segscale: `make demo` (the main job) and `make test`; both install what they need first.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
.DEFAULT_GOAL := help

PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Every install step goes through the constraints file: it pins torch==2.13.0 so pip
# never swaps in a multi-GB CUDA build. apex is optional and never installed from the
# registry (that name is an unrelated package there).
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (for example) makes pip look there
# first for torch, for a CPU-only machine whose default registry only has CUDA builds.
TORCH_INDEX_URL ?=
PIP := $(PY) -m pip install --disable-pip-version-check -c constraints.txt
# pip warns about every absent extra index folder of this machine's pip config: noise.
QUIET_PIP := { grep -v -e "is ignored: it is neither a file nor a directory" || true; }
STAMP := $(VENV)/.segscale-installed

.PHONY: help install demo test lint clean

help:
	@echo "make demo     install, then train the demo on a local Ray instance (2 CPU workers; ~1 min once installed)"
	@echo "make test     install, then run the test suite (~15 min on 2 cores)"
	@echo "make install  create $(VENV) and install segscale with its dev tools (constraints.txt pins torch)"
	@echo "make lint     install, then ruff check ."
	@echo "make clean    delete the demo's data and runs (runs/demo-data, runs/demo-*), build/, dist/,"
	@echo "              *.egg-info, .pytest_cache, .ruff_cache; keeps $(VENV) and every other run in runs/"
	@echo "variables     VENV=$(VENV) PYTHON_SYS=$(PYTHON_SYS) TORCH_INDEX_URL=<a CPU wheel index, for install>"

install: $(STAMP)

# Re-runs only when the packaging files change, so a second `make install` is instant.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	@echo "installing segscale into $(VENV) (torch pinned by constraints.txt)"
	@$(PIP) -q $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL) --extra-index-url https://pypi.org/simple) \
		torch==2.13.0 2>&1 | $(QUIET_PIP)
	@$(PIP) -q -e '.[dev]' 2>&1 | $(QUIET_PIP)
	@$(PY) -m launcher build-ops
	@touch $(STAMP)

demo: install
	$(PY) -m launcher demo

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .

# Only what the demo and the tools made: runs/ is also every training run's default
# output folder (train.output_dir), and its checkpoints are no build leftovers.
clean:
	rm -rf runs/demo-data runs/demo-* build dist *.egg-info .pytest_cache .ruff_cache
