"""Shared fixtures: every test starts seeded, with Pyro validation on and an empty param store."""

from __future__ import annotations

import contextlib
import os

import pyro
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_close(
    actual, expected, *, atol: float = 1e-6, rtol: float = 1e-5, msg: str = ""
) -> None:
    """Compare tensors or numbers with a tolerance that the test states."""
    actual_t = torch.as_tensor(actual, dtype=torch.float64)
    expected_t = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual_t, expected_t, atol=atol, rtol=rtol, msg=msg or None)


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield
    pyro.clear_param_store()


@pytest.fixture(autouse=True)
def _compile_without_code_generation(request, monkeypatch):
    """Compiled steps in tests go through dynamo and AOTAutograd (the same captured graph, the
    same gradients and updates) without inductor's C++ code generation, which takes 5-20 s a
    graph on 2 cores; test_compiled.py compiles with inductor, as fit does."""
    if request.module.__name__ != "test_compiled":
        from lvmkit.inference import compiled

        monkeypatch.setattr(compiled, "BACKEND", "aot_eager")


@contextlib.contextmanager
def interrupted_scoring(monkeypatch, *, block: int, at: int):
    """Evaluation in blocks of ``block`` log-weights, Ctrl-C arriving as block ``at`` is reduced
    (the blocks before it already kept); the real scoring comes back on leaving the block."""
    import importlib

    evaluate_module = importlib.import_module("lvmkit.inference.evaluate")
    monkeypatch.setattr(evaluate_module, "_SCORE_BATCH", block)
    real = evaluate_module.score_chunk
    calls = {"n": 0}

    def dying(log_weights):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real(log_weights)

    monkeypatch.setattr(evaluate_module, "score_chunk", dying)
    try:
        yield
    finally:
        monkeypatch.setattr(evaluate_module, "score_chunk", real)


@pytest.fixture(scope="session")
def mnist_small():
    """A few thousand MNIST images: grey-level train and statically binarized test."""
    import lvmkit

    train = lvmkit.load_mnist("train", limit=3000)
    test = lvmkit.load_mnist("test", binarization="static", limit=300)
    return train, test
