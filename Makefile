# Two commands on a fresh clone: `make demo` and `make test`.  Both create .venv
# and install the project (torch is capped below 2.14, so CPU machines keep the
# CPU build) before running.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PYTHONUNBUFFERED := 1
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_ENABLE_TELEMETRY ?= false
export DO_NOT_TRACK ?= 1

# Serial by default.  PYTEST_WORKERS="-n 2 --dist loadfile" runs two pytest-xdist workers, each
# taking whole test files so a module's Ray cluster stays in one process: slower on 2 cores, where
# the two workers' Ray runs compete for the cores; try it on a larger machine.
PYTEST_WORKERS ?=

.PHONY: install demo test test-fast lint format bench gpu-check frozenlake clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,eval,bench,frozenlake]'
	touch $(STAMP)

install: $(STAMP)

## demo: IFT on the embedded default (local Ray, 2 CPU workers, tiny model, bundled data, sqlite MLflow)
demo: $(STAMP)
	$(VENV)/bin/ift train

## test: the whole suite (about 28 minutes on 2 cores); the slowest tests are listed at the end
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_WORKERS) --durations=25

## test-fast: everything not marked slow (no multi-process Ray/DeepSpeed runs), about 3.5 minutes on 2 cores
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_WORKERS) -m "not slow" --durations=10

## lint: ruff's checks and formatting, configured in pyproject.toml (make format applies both)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## bench: step time/memory per method, the scan, the data path, scaling -> benchmarks/results/
bench: $(STAMP)
	$(PY) -m benchmarks.run --out benchmarks/results

## gpu-check: on a GPU node, <= 8 min: bf16 tokens/s, MFU, IFT/SFT, peak memory vs the dry run (SFT, IFT, DPO x
## ZeRO-2/3 on every visible GPU) and fp32 packed==padded, checkpointing on==off -> benchmarks/results/gpu/.
## Needs only torch, transformers and DeepSpeed: runs with .venv's python if there is one, else $(PYTHON), no install.
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m benchmarks.gpu_check --out benchmarks/results/gpu

frozenlake: $(STAMP)
	$(VENV)/bin/ift frozenlake

clean:
	rm -rf ift_runs mlruns outputs .pytest_cache
