"""Data as the model sees it: the arguments of each call, in Pyro's calling conventions.

A Pyro user calls the model with its own arguments (``svi.step(xs, ys)``); lvmkit does the same.
``data`` is one of

- a tensor or numpy array: one argument, passed as ``x=`` when the model has a parameter named
  ``x`` (lvmkit's own models, and most users'), otherwise as the first positional argument;
- a tuple: positional arguments, in order;
- a dict: keyword arguments.

Tensors and numpy arrays with a first dimension are *per point*: lvmkit cuts them along that
dimension into minibatches and evaluation chunks, so they share its length, the number of points.
Every other value — an int, ``None``, an ``argparse.Namespace``, a module, a 0-d tensor — is passed
unchanged to every call. Models that subsample themselves (``pyro.plate(..., subsample_size=)``) or
take tensors laid out otherwise are given the whole data each step (``fit(batch_size=None)``).
:class:`Data` is one call's arguments; :func:`as_data` makes it from what a user passes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lvmkit.inference.devices import (
    Placement,
    SiteTracker,
    explain_mismatch,
    is_mismatch,
    user_frame,
)

_log = logging.getLogger("lvmkit")


@dataclass(frozen=True)
class Data:
    """The arguments of a model call: ``args`` and ``kwargs``, per-point tensors among them.

    ``form`` says how the user gave them (``"tensor"``, ``"tuple"`` or ``"dict"``), which is what a
    ``transform`` receives and returns; ``x_keyword`` whether a lone tensor is passed as ``x=``.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    form: str = "dict"
    x_keyword: bool = True
    lengths: dict[str, int] = field(default_factory=dict)  # per-point tensors: label → length

    @property
    def num_points(self) -> int | None:
        """The shared length of the per-point tensors (None when there are none)."""
        values = set(self.lengths.values())
        return next(iter(values)) if len(values) == 1 else None

    def check_sliceable(self, name: str = "data") -> int:
        """The number of points, or an error saying why the data cannot be cut into minibatches."""
        if not self.lengths:
            raise ValueError(
                f"{name} holds no per-point tensor to cut into minibatches; a model that reads its "
                "data some other way is trained on the whole of it: use batch_size=None"
            )
        if len(set(self.lengths.values())) > 1:
            raise ValueError(
                f"all tensors in {name} must have the same length; got lengths {self.lengths} "
                "(each is cut per data point along its first dimension). Bind tensors that are "
                "not per point to the model and guide (functools.partial), or give a model that "
                "subsamples itself the whole data with batch_size=None"
            )
        return next(iter(self.lengths.values()))

    def values(self) -> list[Any]:
        return [*self.args, *self.kwargs.values()]

    def tensors(self) -> list[torch.Tensor]:
        """The per-point tensors."""
        return [v for v in self.values() if _per_point(v)]

    def named_tensors(self, name: str) -> list[tuple[str, torch.Tensor]]:
        """Every tensor among the arguments, labelled as the user gave it (``data``,
        ``data[0]``, ``data['y']``)."""
        if self.form == "tensor":
            return [(name, v) for v in self.values() if isinstance(v, torch.Tensor)]
        labelled = [(f"{name}[{i}]", v) for i, v in enumerate(self.args)]
        labelled += [(f"{name}[{k!r}]", v) for k, v in self.kwargs.items()]
        return [(label, v) for label, v in labelled if isinstance(v, torch.Tensor)]

    def map(self, fn: Callable[[torch.Tensor], Any]) -> Data:
        """``fn`` applied to every per-point tensor; other values kept."""
        args = tuple(fn(v) if _per_point(v) else v for v in self.args)
        kwargs = {k: fn(v) if _per_point(v) else v for k, v in self.kwargs.items()}
        return Data(args, kwargs, self.form, self.x_keyword, _lengths(args, kwargs))

    def with_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Data:
        """Other arguments given the same way (a simulated copy of the data, say)."""
        return Data(tuple(args), dict(kwargs), self.form, self.x_keyword, _lengths(args, kwargs))

    def take(self, index: torch.Tensor | slice) -> Data:
        """The points at ``index`` (per-point tensors sliced along their first dimension)."""
        self.check_sliceable()
        if isinstance(index, torch.Tensor) and index.dim() == 1 and index.dtype == torch.int64:
            # (a minibatch by index every step: index_select copies 128 MNIST rows in a third
            # of advanced indexing's time, and a fifth inside an epoch's cold cache)
            return self.map(lambda t: t.index_select(0, index.to(t.device)))
        return self.map(lambda t: t[index])

    def to(self, device: torch.device) -> Data:
        return self.map(lambda t: t.to(device))

    def call(self, fn: Callable[..., Any]) -> Any:
        return fn(*self.args, **self.kwargs)

    def user_form(self) -> Any:
        """The data as the user gave it (a tensor, a tuple or a dict): what a transform gets."""
        if self.form == "tensor":
            return self.kwargs["x"] if self.x_keyword else self.args[0]
        if self.form == "tuple":
            return self.args
        return dict(self.kwargs)

    def describe(self) -> str:
        def one(v: Any) -> str:
            if isinstance(v, torch.Tensor):
                return f"{tuple(v.shape)} {v.dtype}"
            return type(v).__name__

        parts = [one(v) for v in self.args] + [f"{k}: {one(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)


def call_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Data:
    """The arguments of a call as :class:`Data` (what a loss module receives)."""
    args, kwargs = tuple(args), dict(kwargs)
    return Data(args, kwargs, lengths=_lengths(args, kwargs))


def _per_point(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0


def _lengths(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, int]:
    out = {f"[{i}]": v.shape[0] for i, v in enumerate(args) if _per_point(v)}
    out.update({k: v.shape[0] for k, v in kwargs.items() if _per_point(v)})
    return out


def as_data(data: Any, model: Any = None, *, name: str = "data", check_finite: bool = True) -> Data:
    """Validate ``data`` and return it as the arguments of a call of ``model`` (see the module
    docstring); numpy arrays become tensors, floating ones in torch's default dtype."""
    out = _as_data(data, model, name, check_finite)
    if any(length == 0 for length in out.lengths.values()):
        raise ValueError(f"{name} is empty: expected at least one data point; got length 0")
    return out


def _as_data(data: Any, model: Any, name: str, check_finite: bool) -> Data:
    keyword = takes_x(model)
    data = from_pandas(name, data)
    if isinstance(data, (torch.Tensor, np.ndarray)):
        tensor = _as_tensor(name, data, check_finite)
        if tensor.dim() == 0:
            raise ValueError(
                f"{name} must have a data dimension first, shape (N, ...); got a scalar"
            )
        args, kwargs = ((), {"x": tensor}) if keyword else ((tensor,), {})
        return Data(args, kwargs, "tensor", keyword, _lengths(args, kwargs))
    if isinstance(data, tuple):
        if not data:
            raise ValueError(f"{name} must hold at least one argument; got an empty tuple")
        args = tuple(_convert(f"{name}[{i}]", v, check_finite) for i, v in enumerate(data))
        return Data(args, {}, "tuple", keyword, _lengths(args, {}))
    if isinstance(data, Mapping):
        if not data:
            raise ValueError(f"{name} must hold at least one tensor; got an empty dict")
        named: dict[str, Any] = {}
        for key, value in data.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(f"{name} keys must be keyword-argument names; got {key!r}")
            named[key] = _convert(f"{name}[{key!r}]", value, check_finite)
        return Data((), named, "dict", keyword, _lengths((), named))
    raise TypeError(
        f"{name} must be a torch.Tensor, a numpy array, a pandas DataFrame, or a dict of the "
        "model's keyword arguments (or a tuple of its positional arguments; for fit, also a "
        f"list of lvmkit.Source); got {type(data).__name__}"
    )


def from_transform(out: Any, like: Data, *, name: str = "transform") -> Data:
    """A transform's result as the arguments of a call, by the same conventions as ``data``."""
    if isinstance(out, torch.Tensor):
        args, kwargs = ((), {"x": out}) if like.x_keyword else ((out,), {})
        form = "tensor"
    elif isinstance(out, tuple):
        args, kwargs, form = tuple(out), {}, "tuple"
    elif isinstance(out, Mapping):
        args, kwargs, form = (), dict(out), "dict"
    else:
        raise TypeError(
            f"{name} must return the model's arguments (a tensor, a tuple or a dict); "
            f"got {type(out).__name__}"
        )
    return Data(args, kwargs, form, like.x_keyword, _lengths(args, kwargs))


def _convert(label: str, value: Any, check_finite: bool) -> Any:
    """Per-point arrays and tensors checked and converted; anything else passed through."""
    value = from_pandas(label, value)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _as_tensor(label, value, check_finite)
    return value


def from_pandas(label: str, value: Any) -> Any:
    """A pandas DataFrame or Series as a numpy array of its values (a DataFrame's columns in
    their order, said in one log line); a column that is not numeric or boolean is refused by
    name. Anything else is returned as it is."""
    if not isinstance(value, (pd.DataFrame, pd.Series)):
        return value
    frame = isinstance(value, pd.DataFrame)
    columns = list(value.dtypes.items()) if frame else [(value.name, value.dtype)]
    for column, dtype in columns:
        if not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)):
            what = f"column {column!r}" if frame else f"the Series {column!r}"
            raise TypeError(
                f"{label} must be numeric, but {what} has dtype {dtype}: encode it first "
                "(pd.get_dummies, .cat.codes, a mapping) or drop it"
            )
    extension = any(isinstance(dtype, pd.api.extensions.ExtensionDtype) for _, dtype in columns)
    array = (
        value.to_numpy(dtype=np.float64, na_value=np.nan) if extension else value.to_numpy()
    )  # (nullable dtypes: a missing value becomes NaN, which the finiteness check names)
    if frame:
        _log.warning(
            "lvmkit: %s: a DataFrame of %d rows, its columns %s in that order as the last axis",
            label, len(value), list(value.columns),
        )  # fmt: skip
    return array


def _as_tensor(label: str, value: Any, check_finite: bool = True) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype == object or not (
            np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_
        ):
            raise TypeError(f"{label} must be numeric; got a numpy array of dtype {value.dtype}")
        value = np.ascontiguousarray(value)
        if not value.flags.writeable:  # (pandas' copy-on-write arrays; torch needs writable)
            value = value.copy()
        value = torch.from_numpy(value)
    if value.is_complex():
        raise TypeError(f"{label} must be real; got dtype {value.dtype}")
    if value.is_floating_point():
        value = value.to(torch.get_default_dtype())
        if check_finite and value.numel() and not _all_finite(value):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{label} must be finite; got {bad} NaN or infinite values")
    return value


def _all_finite(value: torch.Tensor) -> bool:
    """Whether every element is finite. A finite sum proves it (a NaN or an infinity makes the
    sum non-finite) at a tenth of ``isfinite``'s cost on a whole dataset, which is fit's set-up;
    only a sum that overflowed needs the element-wise check."""
    return bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())


def as_points(data: Any, *, name: str = "data") -> torch.Tensor:
    """One tensor of data points, shape ``(N, ...)`` (for estimators with scikit-learn's API)."""
    data = from_pandas(name, data)
    tensor = _as_tensor(name, data) if isinstance(data, (torch.Tensor, np.ndarray)) else None
    if tensor is None:
        raise TypeError(
            f"{name} must be a torch.Tensor, a numpy array or a pandas DataFrame; got "
            f"{type(data).__name__}"
        )
    if tensor.dim() == 0 or tensor.shape[0] == 0:
        raise ValueError(
            f"{name} must hold at least one data point; got shape {tuple(tensor.shape)}"
        )
    return tensor


def signature(fn: Any) -> inspect.Signature | None:
    """The parameters ``fn`` is called with (an ``nn.Module``'s ``forward``), or None if unknown."""
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


def takes_x(model: Any) -> bool:
    """Whether a lone tensor goes to ``model`` as ``x=``: when it has a parameter named ``x``.
    A model whose parameters cannot be read, or that takes only ``*args, **kwargs``, gets it
    positionally, as Pyro's ``svi.step(data)`` gives it."""
    sig = signature(model) if model is not None else None
    if sig is None:
        return model is None  # no model to ask: lvmkit's own convention
    param = sig.parameters.get("x")
    return param is not None and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def check_signature(model: Any, data: Data, *, name: str = "data", role: str = "model") -> None:
    """A clear error when ``model`` cannot be called with ``data``: its parameters and ours."""
    sig = signature(model)
    if sig is None:
        return
    try:
        sig.bind(*data.args, **data.kwargs)
    except TypeError as err:
        fn = getattr(model, "forward", model) if isinstance(model, nn.Module) else model
        title = getattr(fn, "__qualname__", type(model).__name__)
        raise TypeError(
            f"the {role} {title}{sig} cannot be called with {name} ({data.describe()}): {err}. "
            "A tensor goes to a parameter named x, else first; pass a tuple for positional "
            "arguments or a dict for keyword arguments, in the model's own names"
        ) from None


def check_with_model(model: Any, data: Data) -> None:
    """Let the model refuse data it cannot score (its ``validate_data(...)``, if it has one)."""
    validate = getattr(model, "validate_data", None)
    if callable(validate):
        validate(*data.args, **data.kwargs)


@contextmanager
def model_failures_as_data_errors(
    where: str, data: Data, placement: Placement | None = None, who: str = "fit"
) -> Iterator[None]:
    """Report the model/guide failing on ``data`` (with anything but a ValueError/TypeError, e.g.
    a shape error from deep inside torch) as a ValueError naming ``where`` and the data's shapes,
    with the original error chained: on the first batch such a failure is a data/model mismatch.
    A device mismatch is said as one, with the function and site where it happened and the fix."""
    tracker = SiteTracker()
    try:
        with tracker:
            yield
    except (ValueError, TypeError):
        raise
    except Exception as err:
        if is_mismatch(err):
            raise ValueError(
                f"model/guide failed on {where} ({data.describe()}): "
                + explain_mismatch(err, placement, tracker.last, who)
            ) from err
        lines = str(err).strip().splitlines()
        said = f": {lines[0][:400]}" if lines else " (no message)"
        frame = user_frame(err)
        at = f" in {frame}" if frame else ""
        raise ValueError(
            f"model/guide failed on {where} ({data.describe()}): {type(err).__name__}{at}{said}"
        ) from err


def cuda_devices(*in_use: Any) -> list[int]:
    """The CUDA devices whose random state a ``torch.random.fork_rng`` must save: those among
    ``in_use`` (devices, tensors, :class:`Data`, placements), and every visible one once CUDA is
    initialised. A run on the CPU of a machine with CUDA forks none, so it never creates a
    CUDA context (``fork_rng``'s default forks every device, initialising CUDA to do it)."""
    found: set[int] = set()
    for item in in_use:
        values = item.tensors() if isinstance(item, Data) else [item]
        for value in values:
            device = getattr(value, "device", value)
            if isinstance(device, str):
                device = torch.device(device)
            if isinstance(device, torch.device) and device.type == "cuda":
                found.add(device.index if device.index is not None else torch.cuda.current_device())
    if torch.cuda.is_initialized():
        found.update(range(torch.cuda.device_count()))
    return sorted(found)
