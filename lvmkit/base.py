"""The base layer: what every other layer of lvmkit may import, and which imports none of them —
the package version and the argument checks.

Each check raises ``ValueError``/``TypeError`` whose text names the argument, what was expected
and what was given, so that models, guides, inference, the CLI and the benchmarks say it alike.
It loads no torch at import (``import lvmkit`` reads the version from here).
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

try:
    __version__ = version("lvmkit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise with a "did you mean" hint."""
    options = list(choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {options}; got {type(value).__name__}")
    if value not in options:
        close = difflib.get_close_matches(value, options, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {name} {value!r}: expected one of {options}.{hint}")
    return value


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool too


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Return ``value`` as an int if it is an integer ``>= minimum`` (numpy integers accepted,
    bools refused)."""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}; got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value}")
    return value


def check_float(
    name: str, value: Any, *, positive: bool = True, nonnegative: bool = False
) -> float:
    """Return ``value`` as a float if it is a finite real number: >= 0 when ``nonnegative``, else
    > 0 when ``positive``."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    if nonnegative:
        if value < 0:
            raise ValueError(f"{name} must be >= 0; got {value}")
    elif positive and value <= 0:
        raise ValueError(f"{name} must be > 0; got {value}")
    return value


def check_sizes(name: str, value: Any) -> tuple[int, ...]:
    """Return ``value`` as a tuple of positive ints (layer widths)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of positive ints; got {value!r}")
    sizes = tuple(value)
    for size in sizes:
        check_int(f"each entry of {name}", size)
    return sizes


def check_data_matrix(x: Any, data_dim: int, owner: str, config: str, key: str = "x") -> None:
    """Refuse data a model with ``data_dim`` features cannot score: missing, not floating point,
    or not of shape (N, data_dim). ``owner`` and ``config`` name the model in the message, ``key``
    the data entry."""
    import torch  # here: the version above is read without loading torch

    if x is None:
        raise ValueError(f"data must provide {key!r} for a {owner}; got no {key!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"data {key!r} must be a tensor for a {owner}; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"data {key!r} must be floating point for a {owner}; got dtype {x.dtype} "
            f"(convert it with {key}.float())"
        )
    if x.dim() != 2 or x.shape[-1] != data_dim:
        raise ValueError(
            f"data {key!r} must have shape (N, {data_dim}) for this {owner} "
            f"({config}.data_dim={data_dim}); got {tuple(x.shape)}"
        )


def check_bernoulli_data(x: torch.Tensor, key: str = "x") -> None:
    """Refuse data a Bernoulli likelihood cannot score: values outside [0, 1]."""
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 1:
        raise ValueError(
            f"data {key!r} must be in [0, 1] (a Bernoulli decoder needs data in [0, 1]: binary, "
            "or grey levels to binarize with transform=lvmkit.data.binarize); got values in "
            f"[{low:g}, {high:g}]"
        )
