"""Data as the inference layer sees it: a dict of equal-length tensors, validated once.

``fit`` and ``evaluate`` accept a tensor (passed to the model as ``x``), or a dict of tensors passed
as keyword arguments; numpy arrays are accepted and converted. Floating data become the default
torch dtype, so float64 numpy arrays work with float32 networks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

Batch = dict[str, torch.Tensor]


def as_batch(data: Any, *, name: str = "data") -> Batch:
    """Validate ``data`` and return it as ``{keyword: tensor}`` with a shared first dimension."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        items: dict[str, Any] = {"x": data}
    elif isinstance(data, Mapping):
        if not data:
            raise ValueError(f"{name} must hold at least one tensor; got an empty dict")
        items = dict(data)
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor, a numpy array, or a dict of them passed to the "
            f"model as keyword arguments; got {type(data).__name__}"
        )
    batch: Batch = {}
    for key, value in items.items():
        label = (
            name if list(items) == ["x"] and not isinstance(data, Mapping) else f"{name}[{key!r}]"
        )
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"{name} keys must be keyword-argument names; got {key!r}")
        batch[key] = _as_tensor(label, value)
    lengths = {key: t.shape[0] for key, t in batch.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"all tensors in {name} must have the same length; got lengths {lengths}")
    if next(iter(lengths.values())) == 0:
        raise ValueError(f"{name} is empty: expected at least one data point; got length 0")
    return batch


def _as_tensor(label: str, value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype == object or not (
            np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_
        ):
            raise TypeError(f"{label} must be numeric; got a numpy array of dtype {value.dtype}")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{label} must be a torch.Tensor or numpy array; got {type(value).__name__}"
        )
    if value.dim() == 0:
        raise ValueError(f"{label} must have a data dimension first, shape (N, ...); got a scalar")
    if value.is_complex():
        raise TypeError(f"{label} must be real; got dtype {value.dtype}")
    if value.is_floating_point():
        value = value.to(torch.get_default_dtype())
        if value.numel() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{label} must be finite; got {bad} NaN or infinite values")
    return value


def check_with_model(model: Any, batch: Batch) -> None:
    """Let the model refuse data it cannot score (its ``validate_data(**batch)``, if it has one)."""
    validate = getattr(model, "validate_data", None)
    if callable(validate):
        validate(**batch)


def num_points(batch: Batch) -> int:
    return next(iter(batch.values())).shape[0]


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {key: t.to(device) for key, t in batch.items()}


def take(batch: Batch, index: torch.Tensor | slice) -> Batch:
    return {key: t[index] for key, t in batch.items()}


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA when present, else CPU; ``"cuda"`` without CUDA is an error."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}"
        ) from err
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} but this torch build sees no CUDA device; "
            "use device='auto' or 'cpu'"
        )
    return resolved


@contextmanager
def model_failures_as_data_errors(where: str, batch: Batch) -> Iterator[None]:
    """Report the model/guide failing on ``batch`` (with anything but a ValueError/TypeError, e.g.
    a shape error from deep inside torch) as a ValueError naming ``where`` and the data's shapes,
    with the original error chained: on the first batch such a failure is a data/model mismatch."""
    try:
        yield
    except (ValueError, TypeError):
        raise
    except Exception as err:
        shapes = ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in batch.items())
        raise ValueError(
            f"model/guide failed on {where} ({shapes}): "
            f"{type(err).__name__}: {str(err).strip().splitlines()[0][:400]}"
        ) from err


def cuda_devices() -> list[int]:
    """Every visible CUDA device, for ``torch.random.fork_rng`` (none without CUDA)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
