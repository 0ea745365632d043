# Set-up and everyday commands. `make install` is idempotent: it reuses .venv and only installs what is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# The CPU wheel of torch lies on local disk here; an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
# The shared data sets, read by path (never copied): unidetox reads the folder from this variable only. Unless it
# is set already, the folder beside the checkout, where CI clones it.
export UNIDETOX_DATA_DIR ?= $(abspath $(CURDIR)/../shared/data)
# The suite runs as one pytest worker per core, a file per worker (a module's shared fixtures run once), each worker
# at one torch thread: workers with several threads each on the same cores spin at OpenMP barriers and run far slower.
PYTEST_WORKERS ?= auto
# torch's just-in-time extension builds (DeepSpeed ops) of a test run stay in this checkout's git-ignored .cache/, so a
# build lock left behind by an interrupted run of another checkout never reaches this one.
PYTEST := TORCH_EXTENSIONS_DIR=$(CURDIR)/.cache/torch_extensions OMP_NUM_THREADS=1 \
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: install test test-fast distill detox evaluate replicate bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# deepspeed builds against the torch already installed (no isolated build env that would fetch another torch);
# DS_BUILD_OPS=0 leaves its CUDA/C++ ops to JIT on machines that have a compiler toolchain for them.
install: $(PY)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "deepspeed>=0.15"

test: install
	$(PYTEST) $(PYTEST_ARGS)

test-fast: install
	$(PYTEST) -m "not slow and not integration" $(PYTEST_ARGS)

# The main job: anti-expert + distilled detoxifying text on the embedded default (smollm2-135m + local DGHS).
distill: install
	$(VENV)/bin/accelerate launch --num_processes 1 --cpu recipes/distill.py $(ARGS)

detox: install
	$(VENV)/bin/accelerate launch --num_processes 1 --cpu recipes/detox.py $(ARGS)

evaluate: install
	$(VENV)/bin/accelerate launch --num_processes 1 --cpu recipes/evaluate.py $(ARGS)

replicate: install
	$(VENV)/bin/accelerate launch --num_processes 1 --cpu recipes/replicate.py $(ARGS)

bench: install
	$(PY) benchmarks/sampler_throughput.py $(ARGS)

lint: install
	$(VENV)/bin/ruff check unidetox recipes tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info .cache/torch_extensions
