# stic: STIC self-training for LLaVA-v1.6-Mistral on libtorch.
# `make demo` and `make test` work from a fresh clone: `make setup` installs everything (pinned) into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.setup-done
STIC := target/release/stic
export CARGO_TERM_COLOR ?= never

.PHONY: setup build test test-rust test-python demo reproduce bench-generate bench-train bench-ddp check-cuda clean

setup: $(SETUP_STAMP)

$(SETUP_STAMP): requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	ln -sfn "$$($(PY) -c 'import os, torch; print(os.path.dirname(torch.__file__))')" $(VENV)/libtorch
	touch $@

build: setup
	cargo build --release --locked

test: build
	$(MAKE) test-rust
	$(MAKE) test-python

test-rust: setup
	cargo test --release --locked

test-python: build
	$(PY) -m pytest -q -n 2 tests/python

demo: build
	scripts/demo.sh

# make reproduce PROFILE=official|paper (REPRODUCE_ARGS=--plan prints the steps and what is missing).
PROFILE ?= official
reproduce: build
	$(STIC) reproduce --profile $(PROFILE) $(REPRODUCE_ARGS)

bench-generate: build
	$(PY) benches/bench_generate.py $(BENCH_ARGS)

bench-train: build
	$(PY) benches/bench_train.py $(BENCH_ARGS)

bench-ddp: build
	$(PY) benches/bench_ddp.py $(BENCH_ARGS)

check-cuda: build
	benches/cuda_checks.sh

clean:
	rm -rf target $(VENV) results
