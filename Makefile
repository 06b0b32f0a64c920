# stic: STIC self-training for LLaVA-v1.6-Mistral on libtorch.
# `make demo` and `make test` work from a fresh clone: `make setup` installs everything (pinned) into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.setup-done
# transformers 5.x and its PEFT for the tests of checkpoints saved by transformers 5; torch and the rest from .venv
VENV_TF5 := .venv-tf5
TF5_STAMP := $(VENV_TF5)/.setup-done
STIC := target/release/stic
export CARGO_TERM_COLOR ?= never
# The commit `stic eval` records in summary.json (`-dirty` with uncommitted changes; empty outside git).
export STIC_GIT_COMMIT ?= $(shell c=$$(git rev-parse HEAD 2>/dev/null) && { git diff --quiet HEAD 2>/dev/null || c=$$c-dirty; }; echo $$c)

.PHONY: setup build-tools build lint test test-rust test-python demo reproduce bench-generate bench-train bench-ddp bench-memory check-cuda gpu-check clean

setup: build-tools $(SETUP_STAMP) $(TF5_STAMP)

# The JPEG decoder is libjpeg-turbo built from source (turbojpeg-sys): cmake, and nasm for its SIMD code (without
# nasm it builds plain C, which decodes the same pixels, more slowly). Installed from Debian when missing and root.
build-tools:
	@missing=""; for tool in cmake nasm; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (Debian packages)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends$$missing >/dev/null; \
	  else \
	    echo "building stic needs$$missing: install them (Debian/Ubuntu: sudo apt-get install$$missing)" >&2; \
	    command -v cmake >/dev/null || exit 1; \
	  fi; \
	fi

$(SETUP_STAMP): requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	ln -sfn "$$($(PY) -c 'import os, torch; print(os.path.dirname(torch.__file__))')" $(VENV)/libtorch
	touch $@

$(TF5_STAMP): requirements-tf5.txt | $(SETUP_STAMP)
	rm -rf $(VENV_TF5)
	$(PY) -m venv $(VENV_TF5)
	main_site="$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
	own_site="$$($(VENV_TF5)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
	echo "import site; site.addsitedir('$$main_site')" > "$$own_site/shared-main-venv.pth"
	$(VENV_TF5)/bin/pip install --quiet --disable-pip-version-check --no-deps --ignore-installed -r requirements-tf5.txt
	touch $@

build: setup
	cargo build --release --locked

# Formatting and lints (CI runs them before the tests): rustfmt.toml, and clippy with every warning an error.
lint: setup
	cargo fmt --check
	cargo clippy --release --locked --all-targets -- -D warnings

test: build
	$(MAKE) test-rust
	$(MAKE) test-python
	$(MAKE) gpu-check GPU_CHECK_ARGS=--dry-run

test-rust: setup
	cargo test --release --locked

# Passing tests' temporary folders are removed as they finish: kept, the model and logits files add up to ~24 GB.
test-python: build
	$(PY) -m pytest -q -n 2 -o tmp_path_retention_policy=failed tests/python

demo: build
	scripts/demo.sh

# make reproduce PROFILE=official|paper|official-llava-v1.5-7b|... (a folder under configs/; REPRODUCE_ARGS=--plan prints the steps and what is missing).
PROFILE ?= official
reproduce: build
	$(STIC) reproduce --profile $(PROFILE) $(REPRODUCE_ARGS)

bench-generate: build
	$(PY) benches/bench_generate.py $(BENCH_ARGS)

bench-train: build
	$(PY) benches/bench_train.py $(BENCH_ARGS)

bench-ddp: build
	$(PY) benches/bench_ddp.py $(BENCH_ARGS)

# Peak host memory of loading a 7B checkpoint in bf16 and scoring one image prompt (writes ~30 GB of random
# checkpoints under target/bench-memory once; needs ~20 GB of RAM).
bench-memory: build
	$(PY) benches/bench_memory.py $(BENCH_ARGS)

check-cuda: build
	benches/cuda_checks.sh

# The prepared device check for a short GPU lease (docs/speed.md): the existing binary, no build, so that it runs as
# is on a machine with only python3 + torch. GPU_CHECK_ARGS=--dry-run runs every step on the CPU (make test does).
gpu-check:
	benches/gpu_check.sh $(STIC) $(GPU_CHECK_ARGS)

clean:
	rm -rf target $(VENV) $(VENV_TF5) results
