# Two-command quick start: `make demo`, `make test`. Only Python 3 is needed on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := demo_output

.PHONY: install demo test bench gpu-wheels clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m sitskit.demo --out $(DEMO)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_simulator.py
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_models.py
	$(PY) benchmarks/bench_pretrain.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_matmul.py

# Wheels that benchmarks/gpu_suite.sh installs on a GPU machine without package access (its image has torch)
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl hdf5plugin==7.1.0 crc32c==2.9.post0

# What the demo, the README's commands and the tests leave in the checkout (not the venv)
clean:
	rm -rf $(DEMO) .pytest_cache mlflow.db mlflow.db.lock mlartifacts mlruns
	find checkpoints -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
