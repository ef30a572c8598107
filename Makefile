# One target per role (docs/README): `make run` (operator, integrator), `make test` (developer, CI),
# `make train` (whoever trains a model), `make bench` (performance). Each does its own set-up on a fresh
# machine (Python >= 3.11 with pip and venv) in the one virtualenv $(VENV), and re-running is fast: the
# installs are keyed on pyproject.toml through stamp files, so nothing reinstalls unless it changed.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= models/reference.onnx
HOST   ?= 0.0.0.0
PORT   ?= 8000
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: help run test train lint typecheck pytest serve-deps train-deps test-deps clean bench mutation gpu-trip lock image

# PyTorch is chosen explicitly, never left to the resolver: PyPI's Linux torch wheel is the CUDA build
# (hundreds of MB of CUDA libraries). TORCH=cpu (default) takes the CPU build from PyTorch's CPU index;
# TORCH=cu128 the CUDA 12.8 build; TORCH=pip whatever pip's own configuration finds (a machine that keeps
# its own wheels). The version is the train extra's pin in pyproject.toml. Where PIP_FIND_LINKS already
# holds that version's CPU wheel (this workplace's machines and CI), the default is that wheel: the same
# CPU build, no download (the wheel is found in PIP_FIND_LINKS or pip's configured find-links).
TORCH_VERSION := $(shell sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)
# pip's find-links: the environment's and its configuration files' (CI runs without the session's variables)
FIND_LINKS    := $(PIP_FIND_LINKS) $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
TORCH_LOCAL   := $(firstword $(wildcard $(addsuffix /torch-$(TORCH_VERSION)+cpu-*.whl,$(FIND_LINKS))))
TORCH         ?= $(if $(TORCH_LOCAL),pip,cpu)
TORCH_INDEX_cpu   := https://download.pytorch.org/whl/cpu
TORCH_INDEX_cu128 := https://download.pytorch.org/whl/cu128
TORCH_INDEX       := $(TORCH_INDEX_$(TORCH))
TORCH_PIP_ARGS    := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

## make help: the targets, one line each
help:
	@sed -n 's/^## //p' Makefile

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "lesionserve needs Python >= 3.11, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.serve-stamp: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[serve]'
	@touch $@

$(VENV)/.train-stamp: pyproject.toml | $(BIN)/python
	@test -n "$(TORCH_VERSION)" || { echo "lesionserve: no torch==VERSION pin in pyproject.toml's train extra"; exit 1; }
	@case "$(TORCH)" in cpu|cu128|pip) ;; *) echo "lesionserve: TORCH=$(TORCH); use cpu, cu128 or pip"; exit 1;; esac
	$(PIP) install $(TORCH_PIP_ARGS) 'torch==$(TORCH_VERSION)'
	$(PIP) install -e '.[serve,train]'
	@touch $@ $(VENV)/.serve-stamp

$(VENV)/.test-stamp: pyproject.toml | $(BIN)/python
	$(PIP) install $(TORCH_PIP_ARGS) 'torch==$(TORCH_VERSION)'
	$(PIP) install -e '.[serve,train,dev]'
	@touch $@ $(VENV)/.serve-stamp $(VENV)/.train-stamp

serve-deps: $(VENV)/.serve-stamp
train-deps: $(VENV)/.train-stamp
test-deps: $(VENV)/.test-stamp

## make train [TORCH=cpu|cu128|pip]: install the train extra (PyTorch, CPU build unless told) into $(VENV); then
##     $(VENV)/bin/python -m train --help, -m export --help, -m export.evaluate --help (docs/training.md)
train: train-deps
	@echo "lesionserve: training installed in $(VENV) (torch $(TORCH_VERSION), TORCH=$(TORCH)); next: $(BIN)/python -m train --help"

## make run: serve the bundled reference model on $(HOST):$(PORT)
run:
	@test -f $(MODEL) || { echo "lesionserve: $(MODEL) is missing; make it with 'python -m train' then 'python -m export CKPT --out $(MODEL)' (models/build_reference.sh does all of it), or set MODEL=path/to/model.onnx"; exit 1; }
	@$(MAKE) --no-print-directory serve-deps
	$(BIN)/lesionserve serve --model $(MODEL) --host $(HOST) --port $(PORT)

## make test: lint, type-check service/, run the test suite
test: test-deps lint typecheck pytest

lint: test-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: test-deps
	$(BIN)/mypy service

pytest: test-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## make mutation [MODULES="service/batcher.py ..."]: mutation testing with mutmut (docs/testing.md); not in CI
# Each module takes minutes to tens of minutes on 2 cores; mutmut keeps its results in mutants/
# and re-tests only the functions changed since, so a second run is quick.
MUTATION_MODULES := service/batcher.py service/auth.py service/imaging.py service/hospital/dicom.py service/runtime.py \
                    service/media.py service/errors.py service/schemas.py export/parity.py
MODULES ?= $(MUTATION_MODULES)
MUTATION_JOBS ?= 2
mutation: test-deps
	nice -n 10 $(BIN)/mutmut run --max-children $(MUTATION_JOBS) $(foreach m,$(MODULES),'$(subst /,.,$(m:.py=)).*')
	$(BIN)/python tools/mutation_report.py $(MODULES)

## make gpu-trip: pack .trip/ for a lent GPU and print the command to run there (docs/gpu.md)
gpu-trip: test-deps
	$(BIN)/python -m train.trip pack

## make lock: re-resolve deploy/lock/{cpu,gpu}.txt (hash-locked, what the Dockerfiles install) from pyproject.toml
# Run it after any change to the `serve` or `gpu` extra; tests/deploy/test_lock.py fails until then.
# uv (a wheel, installed into the virtualenv here) resolves for the images' Pythons, not this one's.
lock: | $(BIN)/python
	@test -x $(BIN)/uv || $(PIP) install uv
	$(BIN)/python tools/lock.py $(BIN)/uv

## make image: build the CPU image with podman on a debootstrapped base, run it, classify (docs/deploy.md)
image:
	nice -n 10 deploy/image/build-and-run.sh

## make bench [BENCH_ARGS=...]: load-test the service (docs/service.md); its default model is built with onnx (train extra)
bench: train-deps
	$(BIN)/python -m service.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
