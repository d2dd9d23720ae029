# The two set-up commands of the README, for a fresh machine:
#   make demo   installs what it needs in .venv and runs the main job (IVF-QINCo against faiss
#               IVF-PQ / IVF-RQ on the built-in real descriptors; DEMO_ARGS='--epochs 5' etc.)
#   make test   installs the test dependencies in .venv and runs the test suite (.ci/run)
#   make docs   builds the documentation site (mkdocs, strict) into site/, offline
# Both are idempotent: a second run reuses .venv.

PYTHON ?= python3
VENV ?= .venv
EXTRA ?= cpu            # cuda12 / cuda13 on a machine with NVIDIA GPUs (see pyproject.toml)
TORCH ?= torch==2.13.0  # only for the tests that check compatibility with the PyTorch reference
DEMO_OUT ?= runs/demo
DEMO_ARGS ?=

PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-$(strip $(EXTRA))

.PHONY: demo test docs install install-test clean-demo

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q -e ".[$(strip $(EXTRA)),demo]"
	touch $@

install: $(STAMP)

$(VENV)/.installed-test: $(STAMP)
	$(PIP) install -q -e ".[$(strip $(EXTRA)),test]" "$(strip $(TORCH))"
	touch $@

install-test: $(VENV)/.installed-test

demo: install
	$(PY) -m qinco_jax.cli.main_job --out $(DEMO_OUT) $(DEMO_ARGS)

test: install-test
	QINCO_REQUIRE_TORCH=1 $(PY) -m pytest -q tests

$(VENV)/.installed-docs: $(STAMP)
	$(PIP) install -q -e ".[$(strip $(EXTRA)),docs]"
	touch $@

# NO_MKDOCS_2_WARNING: mkdocs-material's banner about its successor, printed on every build
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean-demo:
	rm -rf $(DEMO_OUT)
