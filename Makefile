# Two commands on a fresh machine (Python 3.11 + pip): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_BASE := $(VENV)/.installed-base
STAMP_DEV := $(VENV)/.installed-dev
STAMP_ALL := $(VENV)/.installed-all
DEMO_DIR ?= workdirs/demo
PYTEST_ARGS ?=
# pytest-xdist worker processes (auto: one per CPU core; 0 runs the tests in this process)
PYTEST_WORKERS ?= auto

STAMP_INTEROP := $(VENV)/.installed-interop

.PHONY: demo test test-faults test-notebooks test-interop venv bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP_BASE): setup.py | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(STAMP_DEV): setup.py | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP_BASE) $@

$(STAMP_ALL): setup.py | $(PY)
	$(PY) -m pip install --quiet -e ".[dev,interop,gcs]"
	touch $(STAMP_BASE) $(STAMP_DEV) $@

## make demo: set up .venv and pre-train the default CLIP on the embedded synthetic dataset, then evaluate.
demo: $(STAMP_BASE)
	$(PY) -m vlm_jax.pretrain --config=configs/pretrain/clip.py:tiny --workdir=$(DEMO_DIR)

## make test: set up .venv with the test extras and run the suite (8 simulated CPU devices), less the slow faults
## and the notebooks.
test: $(STAMP_DEV)
	$(PY) -m pytest tests -q -n $(PYTEST_WORKERS) -m "not faults and not notebooks" $(PYTEST_ARGS)

## make test-notebooks: execute every notebooks/*.ipynb top to bottom on CPU-sized settings (marker `notebooks`).
test-notebooks: $(STAMP_DEV)
	$(PY) -m pytest tests/test_notebooks.py -q -rP -n $(PYTEST_WORKERS) -m notebooks $(PYTEST_ARGS)

## make test-faults: the slow part of the fault suite (marker `faults`: kills, dead host, disk full, ...).
test-faults: $(STAMP_DEV)
	$(PY) -m pytest tests -q -n $(PYTEST_WORKERS) -m faults $(PYTEST_ARGS)

$(STAMP_INTEROP): setup.py | $(PY)
	$(PY) -m pip install --quiet -e ".[dev,interop]"
	touch $(STAMP_BASE) $(STAMP_DEV) $@

## make test-interop: add torch/open_clip/transformers/webdataset and run the parity tests (marker `interop`).
test-interop: $(STAMP_INTEROP)
	$(PY) -m pytest tests -q -n $(PYTEST_WORKERS) -m interop $(PYTEST_ARGS)

## make venv: create/update .venv with every extra (dev, interop, gcs).
venv: $(STAMP_ALL)

## make bench: run the benchmark scripts (JSON lines on stdout).
bench: $(STAMP_DEV)
	@for f in benchmarks/*.py; do echo "# $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) workdirs
