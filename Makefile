# The README's two commands: `make run` and `make test`. Each does its own set-up on a fresh
# machine (Python >= 3.11 with pip and venv), and re-running is fast: the installs are keyed
# on pyproject.toml through stamp files, so nothing reinstalls unless it changed.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= models/reference.onnx
HOST   ?= 0.0.0.0
PORT   ?= 8000
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: run test lint typecheck pytest serve-deps test-deps clean bench mutation

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "lesionserve needs Python >= 3.11, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.serve-stamp: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[serve]'
	@touch $@

$(VENV)/.test-stamp: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[serve,train,dev]'
	@touch $@ $(VENV)/.serve-stamp

serve-deps: $(VENV)/.serve-stamp
test-deps: $(VENV)/.test-stamp

## make run: serve the bundled reference model on $(HOST):$(PORT)
run:
	@test -f $(MODEL) || { echo "lesionserve: $(MODEL) is missing; make it with 'python -m train' then 'python -m export CKPT --out $(MODEL)' (models/build_reference.sh does all of it), or set MODEL=path/to/model.onnx"; exit 1; }
	@$(MAKE) --no-print-directory serve-deps
	LESIONSERVE_MODEL_PATH=$(MODEL) LESIONSERVE_HOST=$(HOST) LESIONSERVE_PORT=$(PORT) $(BIN)/python -m service

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

bench: serve-deps
	$(BIN)/python -m service.bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
