# DAVI: one-step diffusion-prior image restoration. `make demo`, `make test`.
SHELL := /bin/bash
# libtorch's OpenMP threads spin while waiting by default; passive waiting keeps parallel jobs fair.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: all setup setup-runtime build build-runtime test parity demo bench zoo paper-scale fmt lint clean test-venv

all: build

setup:
	scripts/setup

setup-runtime:
	scripts/setup --runtime-only

build: setup
	cargo build --release --workspace

build-runtime: setup-runtime
	cargo build --release -p davi-runtime

## The test-only Python venv: the `onnx` package, whose checker the export tests run (pinned by
## sha256 in scripts/lock/test-venv.txt).
test-venv:
	@[ -x .deps/test-venv/bin/python ] && .deps/test-venv/bin/python -c "import onnx" 2>/dev/null || \
	  (python3 -m venv .deps/test-venv && .deps/test-venv/bin/pip install --quiet --only-binary=:all: --require-hashes \
	     -r scripts/lock/test-venv.txt && echo "test-venv: onnx installed")

## Every test: unit and end-to-end tests (release profile: one build serves both), then the parity job.
test: build test-venv
	cargo fmt --all -- --check
	cargo clippy --release --workspace --all-targets -- -D warnings
	cargo test --release --workspace --exclude davi-train
	cargo test --release -p davi-train --test '*'
	@# The unit tests of davi-train share libtorch's one global random generator: one at a time,
	@# so that a test that seeds it gets the numbers it seeded.
	cargo test --release -p davi-train --lib --bins -- --test-threads=1
	$(MAKE) --no-print-directory parity

## A tiny model trained a few steps, exported, and `davi verify` on the CPU EP.
parity: build
	scripts/parity.sh out/parity

## The main job on the shipped models (runtime only once trained models ship).
demo:
	scripts/demo.sh


## Speed and memory figures (BENCHMARKS.md); run on an idle machine.
bench: build
	scripts/bench.sh

## The whole chain at 256 px on the CPU with random weights (minutes; not part of `make test`).
paper-scale: build
	scripts/paper-scale.sh

## Retrain every shipped model from its committed config, then export and evaluate.
zoo: build
	scripts/zoo.sh

fmt:
	cargo fmt --all

lint: build
	cargo clippy --release --workspace --all-targets -- -D warnings

clean:
	rm -rf out target
