# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates its own virtual environment and installs what it needs.
# TORCH_SPEC picks the torch build; the default is the CPU build on this machine's disk.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.demo-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[demo]"
	touch $@

# the test environment holds the docs extra too, so it stamps both (.ci/run: make test, then
# make docs in the same environment, with nothing more to install)
$(VENV)/.test-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test,demo,docs]"
	touch $@ $(VENV)/.docs-installed

# the docs alone: the docs extra and the package's own dependencies (torch from TORCH_SPEC, as
# pip would otherwise fetch the default build); mkdocstrings reads the sources without importing
$(VENV)/.docs-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[docs]"
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/rkekernels demo

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

# the inner loop: the scores, Vendi, guidance, bandwidths, statistics, CLI and layout checks
# (no diffusers pipelines, Triton interpreter, process groups or doctests); ~20 s on 2 cores
FAST_TESTS := scores scores_properties scores_grad vendi guidance guidance_cpu sampling \
	guidance_defaults bandwidth compare layout bad_input reference evaluation novelty meaning \
	approx_error metrics cli
test-fast: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -m "not slow" $(patsubst %,tests/test_%.py,$(FAST_TESTS))

docs: $(VENV)/.docs-installed
	$(BIN)/mkdocs build --strict --site-dir site

bench: $(VENV)/.test-installed
	$(BIN)/rkekernels bench

clean:
	rm -rf $(VENV) site build *.egg-info .pytest_cache .ruff_cache
