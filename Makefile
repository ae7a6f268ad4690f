# The two commands of README.md: `make study` and `make test`. Both set up .venv on first use and
# reinstall only when pyproject.toml or constraints.txt changed.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
PROFILE ?= demo
NAME ?= $(PROFILE)
ifneq ($(wildcard .tools/quarto/bin/quarto),)
export PATH := $(CURDIR)/.tools/quarto/bin:$(PATH)
endif

.PHONY: study results test lint check-sync check-readme readme nbtest nbtest-library pytest docs bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# One stamp per install flavour; each depends on the files that define it.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install --disable-pip-version-check -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install --disable-pip-version-check -q -c constraints.txt -e ".[dev]"
	touch $@ $(VENV)/.installed

study: $(VENV)/.installed
	$(BIN)/mura-study reproduce --profile $(PROFILE) --name $(NAME)

# Keep the run's report, tables, figures and executed notebooks in results/<name> (committed: the README and the
# docs show them), then render the README.
results: $(VENV)/.installed-dev
	@test -f runs/$(NAME)/report.md || { echo "runs/$(NAME)/report.md is missing: run 'make study' first."; exit 1; }
	$(BIN)/mura-study results --name $(NAME)
	$(MAKE) readme

test: $(VENV)/.installed-dev lint check-sync check-readme nbtest-library pytest

# ruff over the notebooks (the source), the modules and the tests; its rules and why are in pyproject.toml.
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check --no-cache .

# Fails when nbdev-clean or nbdev-export would change a file: notebooks must be clean, modules exported.
check-sync: $(VENV)/.installed-dev
	@before=$$(git status --porcelain -- nbs mura_study pyproject.toml; git diff -- nbs mura_study pyproject.toml | sha1sum); \
	$(BIN)/nbdev-clean; $(BIN)/nbdev-export; \
	after=$$(git status --porcelain -- nbs mura_study pyproject.toml; git diff -- nbs mura_study pyproject.toml | sha1sum); \
	if [ "$$before" != "$$after" ]; then \
	  echo "nbdev-clean/nbdev-export changed files: run them and commit the result."; \
	  git status --porcelain -- nbs mura_study pyproject.toml; exit 1; fi; \
	echo "notebooks clean, modules in sync"

# README.md is generated from nbs/index.ipynb (nbdev-readme needs Quarto; nbconvert does not).
README_TMP := $(VENV)/readme
define render_readme
	rm -rf $(README_TMP) && mkdir -p $(README_TMP)
	cd nbs && ../$(BIN)/jupyter nbconvert --log-level=ERROR --to markdown --execute --no-input \
	  --output-dir ../$(README_TMP) --output README index.ipynb
endef

readme: $(VENV)/.installed-dev
	$(render_readme)
	cp $(README_TMP)/README.md README.md

check-readme: $(VENV)/.installed-dev
	$(render_readme)
	@cmp -s $(README_TMP)/README.md README.md || { echo "README.md is stale: run 'make readme' and commit it."; diff $(README_TMP)/README.md README.md | head -20; exit 1; }
	@echo "README.md up to date"

# nbdev-test of every notebook (`#| slow` cells skipped).
nbtest: $(VENV)/.installed-dev
	$(BIN)/nbdev-test --n-workers 2 --timing

# What `make test` runs of it: the library chapters and the index. The study's chapters (synth, data, learner, tuning,
# interpret) run whole, `#| slow` cells included, in pytest's end-to-end `reproduce --profile ci`, whose parameters are
# those their `parameters` cells hold: nbdev-test would only run them a second time. tests/test_style.py checks that
# this list and the study's chapters cover every notebook.
LIBRARY_NOTEBOOKS := ^(00_core|03_metrics|07_bench|08_study|index)\.ipynb$$
nbtest-library: $(VENV)/.installed-dev
	$(BIN)/nbdev-test --n-workers 2 --timing --file-re '$(LIBRARY_NOTEBOOKS)'

# Two workers of one thread each, and every chapter a test runs on one thread too (MURA_STUDY_THREADS), so that the
# two never share a core. A file's tests stay on one worker (its module fixtures are built once); the end-to-end run
# is built once for both (tests/conftest.py). `--dist loadgroup` would be finer, but with pytest 9.2 it silently
# stops grouping (pytest-xdist issue #1386).
pytest: $(VENV)/.installed-dev
	MURA_STUDY_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# The site of the kept demo run (results/demo), nothing re-executed: Quarto's when quarto exists (on the path, or
# installed into .tools/quarto by ../shared/tools/quarto/install.sh), otherwise nbconvert's pages.
docs: $(VENV)/.installed-dev
	@command -v quarto >/dev/null || echo "quarto not found: rendering each notebook with nbconvert into _docs/ instead"
	$(BIN)/mura-study docs

# Every chapter's benchmark, side by side, into results/bench.csv: the table the chapters show. Minutes on a CPU.
bench: $(VENV)/.installed-dev
	$(BIN)/mura-study bench

clean-venv:
	rm -rf $(VENV)
