# Two entry points, each doing all of its own set-up in ./.venv:
#   make demo   kill a training run mid-save, resume it from the remote alone
#   make test   the whole suite (lint included)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# TensorFlow is not a dependency of ckptstore (users bring their own build);
# the suite and the demo install the CPU build themselves.
TF_REQ ?= tensorflow-cpu==2.21.*
DEPS   := $(VENV)/.deps-installed
BENCH_DEPS := $(VENV)/.bench-deps-installed

.PHONY: demo test lint bench bench-link clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(DEPS): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TF_REQ)" -e ".[test]"
	touch $@

demo: $(DEPS)
	$(BIN)/python examples/demo.py

lint: $(DEPS)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

test: lint
	$(BIN)/python -m pytest -q

$(BENCH_DEPS): pyproject.toml $(DEPS)
	$(BIN)/python -m pip install -q -e ".[bench]"
	touch $@

bench: bench-link
	$(BIN)/python benchmarks/save_blocking.py
	$(BIN)/python benchmarks/upload_throughput.py
	$(BIN)/python benchmarks/drive_transfer.py

# ckptstore against tf.train.CheckpointManager on a 40 MB/s link (about 15 minutes);
# writes benchmarks/results/slow_link.{md,json,png}. ARGS=--quick for a 2-minute smoke run.
bench-link: $(BENCH_DEPS)
	$(BIN)/python benchmarks/slow_link.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo-run
