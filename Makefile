# Two entry points, each doing all of its own set-up in ./.venv:
#   make demo   kill a training run mid-save, resume it from the remote alone
#   make test   the whole suite (lint included), then a smoke part of it under each
#               Python in SMOKE_PYTHONS (see smoke-pythons below)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# TensorFlow is not a dependency of ckptstore (users bring their own build);
# the suite and the demo install the CPU build themselves.
TF_REQ ?= tensorflow-cpu==2.21.*
DEPS   := $(VENV)/.deps-installed
BENCH_DEPS := $(VENV)/.bench-deps-installed

.PHONY: demo test lint bench bench-link clean smoke-pythons smoke-check

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

# smoke-check first: a missing interpreter fails in seconds, not after the 20-minute suite.
test: smoke-check lint
	$(BIN)/python -m pytest -q
	@$(MAKE) --no-print-directory smoke-pythons

$(BENCH_DEPS): pyproject.toml $(DEPS)
	$(BIN)/python -m pip install -q -e ".[bench]"
	touch $@

bench: bench-link
	$(BIN)/python benchmarks/save_blocking.py
	$(BIN)/python benchmarks/upload_throughput.py
	$(BIN)/python benchmarks/drive_transfer.py
	$(BIN)/python benchmarks/upload_cpu.py --tls --profile

# ckptstore against tf.train.CheckpointManager on a 40 MB/s link (about 20 minutes);
# writes benchmarks/results/slow_link.{md,json,png}. ARGS=--quick for a 2-minute smoke run.
bench-link: $(BENCH_DEPS)
	$(BIN)/python benchmarks/slow_link.py $(ARGS)

clean:
	rm -rf $(VENV) $(wildcard $(VENV)-3.*) .pytest_cache .ruff_cache demo-run

# --- The other Pythons ---------------------------------------------------------------------
# ckptstore declares requires-python >= 3.10 (pyproject.toml). .venv runs the whole suite on
# $(PYTHON) (3.11 here); `make test` then runs SMOKE_TESTS, a smoke part of the suite, under each
# Python below, each in its own .venv-3.X with tensorflow-cpu 2.21 and -e .[test].
#   make smoke-pythons                       all of them (about 3-5 minutes each, fresh)
#   make smoke-3.13                          one
#   make test SMOKE_PYTHONS=                 skip them, explicitly
#   make test SMOKE_PYTHONS="3.12"           only some
# python3.X is looked for on PATH (a pyenv shim counts only if it runs), then through pyenv
# (`pyenv prefix 3.X`), then in $PYENV_ROOT/versions (default ~/.pyenv). A Python that is not
# found fails the run with how to get it; it is never skipped silently.
SMOKE_PYTHONS ?= 3.10 3.12 3.13
# The data path (save -> upload -> verify -> commit -> restore on a fresh manager) on a local
# directory, S3 (moto server) and GCS (fake-gcs-server); a corrupt upload never restored; a
# writer SIGKILLed mid-upload and at commit (file and S3); the CLI through its entry point.
SMOKE_TESTS ?= \
	'tests/test_remote_conformance.py::test_round_trip_restores_the_last_step_on_an_empty_machine[file]' \
	'tests/test_remote_conformance.py::test_round_trip_restores_the_last_step_on_an_empty_machine[s3]' \
	'tests/test_remote_conformance.py::test_round_trip_restores_the_last_step_on_an_empty_machine[gcs]' \
	'tests/test_remote_conformance.py::test_corrupted_data_file_is_never_loaded_and_previous_is_restored[s3]' \
	'tests/test_remote_conformance.py::test_restarted_manager_continues_numbering_and_retention[s3]' \
	'tests/test_kill_points.py::test_kill_leaves_the_last_committed_checkpoint_restorable[mid-upload]' \
	'tests/test_kill_points.py::test_kill_over_http_leaves_the_last_committed_checkpoint_restorable[s3-at-commit]' \
	tests/test_errors.py::test_a_note_naming_the_url_survives_on_every_python \
	tests/test_cli.py
SMOKE_TARGETS := $(addprefix smoke-,$(SMOKE_PYTHONS))
SMOKE_FIND    := $(addprefix smoke-find-,$(SMOKE_PYTHONS))
.PHONY: $(SMOKE_TARGETS) $(SMOKE_FIND)
.PRECIOUS: $(VENV)-%/.deps-installed

comma := ,
# Prints the real path of a working python$(1) (with venv and ensurepip), or nothing.
find_python = for c in python$(1) \
	  "$$(pyenv prefix $(1) 2>/dev/null | head -n 1)/bin/python$(1)" \
	  $$(ls -d "$${PYENV_ROOT:-$$HOME/.pyenv}"/versions/$(1).* 2>/dev/null | sort -r -V \
	     | sed 's|$$|/bin/python$(1)|'); do \
	  "$$c" -c 'import sys, venv, ensurepip; \
	    assert sys.version_info[:2] == ($(subst .,$(comma),$(1))); print(sys.executable)' \
	    2>/dev/null && break; \
	done
define no_python
echo "error: no working python$(1), which make test needs (SMOKE_PYTHONS=\"$(SMOKE_PYTHONS)\")." >&2; \
echo "  With pyenv:     pyenv install $(1)   (found through pyenv prefix; no pyenv global needed)" >&2; \
echo "  With uv:        uv python install $(1)   (puts python$(1) in ~/.local/bin: keep it on PATH)" >&2; \
echo "  Debian, Ubuntu: apt-get install python$(1) python$(1)-venv   (where the release ships it)" >&2; \
echo "  Any python$(1) on PATH that has venv and ensurepip will do." >&2; \
echo "  Or skip it, explicitly: make test SMOKE_PYTHONS=\"$(strip $(filter-out $(1),$(SMOKE_PYTHONS)))\"" >&2; \
exit 1
endef

smoke-check: $(SMOKE_FIND)
	@[ -n "$(strip $(SMOKE_PYTHONS))" ] || echo "smoke-check: SMOKE_PYTHONS is empty: no other Python will be tested"

$(SMOKE_FIND): smoke-find-%:
	@py=$$($(call find_python,$*)); \
	if [ -z "$$py" ]; then $(call no_python,$*); fi; \
	echo "smoke-check: python$* is $$py"

# The venv and its packages, timed together (as on a fresh machine when the stamp is missing).
$(VENV)-%/.deps-installed: pyproject.toml
	@start=$$(date +%s); \
	if [ ! -x $(VENV)-$*/bin/python ]; then \
	  py=$$($(call find_python,$*)); \
	  if [ -z "$$py" ]; then $(call no_python,$*); fi; \
	  echo "$(VENV)-$*: $$py -m venv"; \
	  "$$py" -m venv $(VENV)-$* && $(VENV)-$*/bin/python -m pip install -q --upgrade pip || exit 1; \
	fi; \
	echo "$(VENV)-$*: pip install $(TF_REQ) -e .[test]"; \
	$(VENV)-$*/bin/python -m pip install -q "$(TF_REQ)" -e ".[test]" || exit 1; \
	echo "smoke $*: venv installed in $$(( $$(date +%s) - start )) s"
	touch $@

smoke-pythons: $(SMOKE_TARGETS)
	@[ -n "$(strip $(SMOKE_PYTHONS))" ] || echo "smoke-pythons: SMOKE_PYTHONS is empty: skipped"

$(SMOKE_TARGETS): smoke-%: $(VENV)-%/.deps-installed
	@echo "smoke $*: $$($(VENV)-$*/bin/python -V) runs $(words $(SMOKE_TESTS)) test ids"
	@start=$$(date +%s); \
	$(VENV)-$*/bin/python -m pytest -q -p no:cacheprovider $(SMOKE_TESTS); rc=$$?; \
	echo "smoke $*: tests took $$(( $$(date +%s) - start )) s (exit $$rc)"; \
	exit $$rc
