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

Several data sets with their own minibatch sizes go into one ``fit`` as a list of :class:`Source`
(e.g. M2's labelled and unlabelled images): each step calls the pair once per source.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from lvmkit.inference import _memory
from lvmkit.inference._device import (
    Placement,
    SiteTracker,
    explain_mismatch,
    is_mismatch,
    move_pair,
    place,
    user_frame,
)

AUTO = "auto"  # Source(batch_size="auto"): the source's share of each step (see Source)


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

    def take(self, index: torch.Tensor | slice) -> Data:
        """The points at ``index`` (per-point tensors sliced along their first dimension)."""
        self.check_sliceable()
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
    if isinstance(data, Source):
        raise TypeError(f"{name} must be data, not a lvmkit.Source (sources are for fit)")
    keyword = takes_x(model)
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
        f"{name} must be a torch.Tensor, a numpy array, or a dict of the model's keyword "
        f"arguments (or a tuple of its positional arguments; for fit, also a list of "
        f"lvmkit.Source); got {type(data).__name__}"
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
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _as_tensor(label, value, check_finite)
    return value


def _as_tensor(label: str, value: Any, check_finite: bool = True) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype == object or not (
            np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_
        ):
            raise TypeError(f"{label} must be numeric; got a numpy array of dtype {value.dtype}")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if value.is_complex():
        raise TypeError(f"{label} must be real; got dtype {value.dtype}")
    if value.is_floating_point():
        value = value.to(torch.get_default_dtype())
        if check_finite and value.numel() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{label} must be finite; got {bad} NaN or infinite values")
    return value


def as_points(data: Any, *, name: str = "data") -> torch.Tensor:
    """One tensor of data points, shape ``(N, ...)`` (for estimators with scikit-learn's API)."""
    tensor = _as_tensor(name, data) if isinstance(data, (torch.Tensor, np.ndarray)) else None
    if tensor is None:
        raise TypeError(
            f"{name} must be a torch.Tensor or a numpy array; got {type(data).__name__}"
        )
    if tensor.dim() == 0 or tensor.shape[0] == 0:
        raise ValueError(
            f"{name} must hold at least one data point; got shape {tuple(tensor.shape)}"
        )
    return tensor


# -- the model's signature ----------------------------------------------------------------------


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


# -- several sources in one fit ---------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One data set of :func:`lvmkit.fit`, with its own minibatch size and transform.

    Pass a list of sources as ``data`` to train on several data sets at once — e.g. M2's
    unlabelled images and its few labelled ones: every step takes one minibatch of each source,
    calls the model and guide on each, and sums the losses. ``batch_size``:

    - ``"auto"`` (default): the source's share, the size that passes it once per epoch, i.e. every
      source is seen once per epoch, whatever its size (for a source of N points over an epoch of
      S steps, ⌈N / S⌉);
    - an int: that many points per step; a source that runs out before the epoch ends starts
      again in a new order (so it is seen more than once an epoch);
    - ``None``: the whole source every step.

    An epoch has as many steps as the source that needs most (with ``"auto"`` sources counted as
    needing none, and ``fit``'s ``batch_size`` applied to the largest source when every source is
    ``"auto"``). ``transform`` is applied to this source's minibatches (after ``fit``'s own, if
    any).

    Example::

        >>> import torch, lvmkit
        >>> unlabelled = lvmkit.Source(torch.rand(90, 4))
        >>> labelled = lvmkit.Source((torch.rand(10, 4), torch.zeros(10)), batch_size=5)
        >>> labelled.batch_size
        5
    """

    data: Any
    batch_size: int | str | None = AUTO
    transform: Callable[[Any], Any] | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        size = self.batch_size
        ok = size is None or size == AUTO or (isinstance(size, int) and not isinstance(size, bool))
        if not ok or (isinstance(size, int) and size < 1):
            raise ValueError(
                f"Source.batch_size must be 'auto', None (the whole source) or an int >= 1; "
                f"got {size!r}"
            )
        if self.transform is not None and not callable(self.transform):
            raise TypeError(
                f"Source.transform must be callable or None; got {type(self.transform).__name__}"
            )


@dataclass(frozen=True)
class Interleaved:
    """Several data sets stepped as Pyro's semi-supervised examples step them
    (``examples/vae/ss_vae_M2.py``): every minibatch of every source is an optimizer step of its
    own, the smaller sources' minibatches interleaved among the largest's — the step ``i`` of an
    epoch takes the next minibatch of a smaller source when ``i % period == 1`` (while it has
    any left), else of the largest. ``period`` defaults to the epoch's steps over the smaller
    source's steps (Pyro's ``periodic_interval_batches``). Each source passes once per epoch;
    its ``batch_size`` is an int, ``None`` (the whole source as one step) or ``"auto"``
    (``fit``'s ``batch_size``).

    A plain list of :class:`Source` instead sums one minibatch of every source into each step
    (fewer, larger steps): the two differ in updates per epoch, so to reproduce a Pyro example's
    numbers use the schedule its loop uses.

    Example::

        >>> import torch, lvmkit
        >>> unlabelled = lvmkit.Source(torch.rand(90, 4), batch_size=10)
        >>> labelled = lvmkit.Source((torch.rand(20, 4), torch.zeros(20)), batch_size=10)
        >>> lvmkit.Interleaved([unlabelled, labelled]).schedule([9, 2])
        [0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    """

    sources: list[Source]
    period: int | None = None

    def __post_init__(self) -> None:
        sources = self.sources
        if not isinstance(sources, (list, tuple)) or len(sources) < 2:
            raise TypeError(
                "Interleaved.sources must be a list of at least two lvmkit.Source; got "
                f"{type(sources).__name__}"
            )
        if not all(isinstance(s, Source) for s in sources):
            raise TypeError("Interleaved.sources must hold lvmkit.Source items only")
        period = self.period
        if period is not None and (isinstance(period, bool) or not isinstance(period, int)
                                   or period < 1):  # fmt: skip
            raise ValueError(f"Interleaved.period must be an int >= 1 or None; got {period!r}")

    def schedule(self, steps: list[int]) -> list[int]:
        """The source of each step of an epoch, given each source's steps per pass."""
        main = max(range(len(steps)), key=lambda j: steps[j])
        total = sum(steps)
        minors = [j for j in range(len(steps)) if j != main]
        periods = {j: self.period or max(1, total // max(1, steps[j])) for j in minors}
        used = [0] * len(steps)
        out = []
        for i in range(total):
            due = [j for j in minors if used[j] < steps[j] and i % periods[j] == 1 % periods[j]]
            if due:
                pick = due[0]
            elif used[main] < steps[main]:
                pick = main
            else:
                pick = next(j for j in minors if used[j] < steps[j])
            used[pick] += 1
            out.append(pick)
        return out


@dataclass
class Feed:
    """A data set as the training loop uses it: its data (checked, on the run's device), the
    transform its minibatches go through (``fit``'s, then its :class:`Source`'s), and how many of
    its points each step of an epoch takes (a fixed minibatch size, an even share, or the whole
    data). ``layout`` is what the pair's first call on it showed (its data plate), filled in when
    the trainer is prepared."""

    data: Data
    batch_size: int | str | None  # None: the whole data every step; AUTO: an even share
    transform: Callable[[Any], Any] | None
    name: str
    num_points: int | None
    placement: Placement = field(default_factory=lambda: Placement(torch.device("cpu")))
    shares: list[int] | None = None  # with AUTO: the points of each step, summing to N
    layout: Any = None  # weights.Layout, or None: no plate over the points found

    @property
    def steps(self) -> int:
        """Steps to pass this source once."""
        if self.shares is not None:
            return len(self.shares)
        if not isinstance(self.batch_size, int) or self.num_points is None:
            return 1
        return -(-self.num_points // self.batch_size)

    def bounds(self, position: int, n: int) -> tuple[int, int]:
        """Where the minibatch at ``position`` of a pass over ``n`` points starts and stops."""
        if self.shares is not None:
            start = sum(self.shares[:position])
            return start, start + self.shares[position]
        size = int(self.batch_size)  # type: ignore[arg-type]
        return position * size, min(n, (position + 1) * size)

    def batch(self, order: torch.Tensor | None, position: int) -> Data | None:
        """The minibatch at ``position`` of a pass in ``order``, transformed (the whole data when
        unbatched; None when an even share leaves this step nothing)."""
        if self.batch_size is None or order is None:
            return self.prepare(self.data)
        start, stop = self.bounds(position, len(order))
        return self.prepare(self.data.take(order[start:stop])) if stop > start else None

    def first(self) -> Data:
        """The set-up step's minibatch: the first points in their stored order, transformed."""
        if self.batch_size is None:
            return self.prepare(self.data)
        start, stop = self.bounds(0, self.num_points or 1)
        return self.prepare(self.data.take(slice(0, max(1, stop - start))))

    def prepare(self, batch: Data) -> Data:
        """``batch`` through the feed's transform (run under the placement's default device)."""
        if self.transform is None:
            return batch
        with self.placement.scope():
            return from_transform(self.transform(batch.user_form()), batch)

    def represented(self, points: int) -> float:
        """The data points a loss on ``points`` of them stands for: the plate's declared full
        size when the model scales its minibatches up to it (N / n), else the points."""
        return self.layout.represented(points) if self.layout is not None else float(points)


@dataclass(frozen=True)
class Feeds:
    """``fit``'s data, loaded: the training feeds and the validation feed, checked and on the
    device of ``placement``."""

    train: list[Feed]
    val: Feed | None
    placement: Placement
    schedule: list[int] | None = None  # Interleaved: the feed of each step of an epoch

    def all(self) -> list[Feed]:
        return [*self.train, *([self.val] if self.val is not None else [])]


def load(
    data: Any,
    model: Any,
    guide: Any,
    *,
    batch_size: int | None,
    transform: Callable[[Any], Any] | None = None,
    validation_data: Any = None,
    device: str | torch.device | None = None,
    memory_budget: Any = None,
    join: Callable[[torch.device], torch.device] | None = None,
) -> Feeds:
    """``fit``'s data as feeds, in one trip: converted and checked (the model's own
    ``validate_data`` too), placed by the device policy (:func:`~lvmkit.inference._device.place`:
    ``device=None`` moves nothing), checked against the memory budget, and moved there.
    ``join`` (several processes) turns the chosen device into this process's."""
    schedule = None
    if isinstance(data, Interleaved):
        sources = [replace(s, batch_size=batch_size) if s.batch_size == AUTO else s
                   for s in data.sources]  # fmt: skip
        train = _train_feeds(sources, model, batch_size, transform)
        schedule = data.schedule([f.steps for f in train])
    else:
        train = _train_feeds(data, model, batch_size, transform)
    val = _validation_feed(validation_data, model)
    loaded = [*train, *([val] if val is not None else [])]
    for f in loaded:
        check_with_model(model, f.data)
    placement = place(device, model, guide, ((f.name, t) for f in loaded for t in f.data.tensors()))
    if join is not None:  # several processes: each its own GPU
        placement.device = join(placement.device)
        if placement.moves:
            move_pair(placement, model, guide)
    dev = placement.device
    if dev.type != "cpu":  # on the CPU the data are in memory already
        data_bytes = _memory.tensor_bytes([t for f in loaded for t in f.data.tensors()])
        _memory.check_data(data_bytes, memory_budget, dev)
    for f in loaded:
        if any(t.device != dev for t in f.data.tensors()):
            f.data = f.data.to(dev)
            placement.note("data", f.name)
        f.placement = placement
    return Feeds(train, val, placement, schedule)


def _train_feeds(
    data: Any, model: Any, batch_size: int | None, transform: Callable[[Any], Any] | None
) -> list[Feed]:
    """``fit``'s data as one feed, or a list of :class:`Source` as several."""
    name = "data"
    if isinstance(data, Source):
        data = [data]
    if isinstance(data, list) and data and all(isinstance(s, Source) for s in data):
        sources: list[Source] = data
    elif isinstance(data, list) and any(isinstance(s, Source) for s in data):
        raise TypeError(f"{name} mixes lvmkit.Source and other values; make each item a Source")
    elif isinstance(data, list):
        raise TypeError(
            f"{name} is a list; pass a tuple for the model's positional arguments, or a list of "
            "lvmkit.Source for several data sets"
        )
    else:
        sources = [Source(data, batch_size=batch_size)]
    out = []
    for i, source in enumerate(sources):
        label = source.name or (name if len(sources) == 1 else f"{name}[{i}]")
        values = as_data(source.data, model, name=label)
        size = source.batch_size
        points = values.check_sliceable(label) if size is not None else values.num_points
        both = _compose(transform, source.transform)
        out.append(Feed(values, size, both, label, points))
    _share(out, batch_size)
    return out


def _share(out: list[Feed], batch_size: int | None) -> None:
    """Resolve ``"auto"`` batch sizes: each such source split evenly over the epoch's steps,
    so that it is passed exactly once an epoch."""
    auto = [f for f in out if f.batch_size == AUTO]
    if not auto:
        return
    fixed = [f.steps for f in out if f.batch_size != AUTO]
    if fixed:
        steps = max(fixed)
    else:
        largest = max(auto, key=lambda f: f.num_points or 0)
        size = batch_size if batch_size is not None else (largest.num_points or 1)
        steps = -(-(largest.num_points or 1) // size)
    for f in auto:
        n = f.num_points or 1
        edges = [round(i * n / steps) for i in range(steps + 1)]
        f.shares = [b - a for a, b in itertools.pairwise(edges)]


def _validation_feed(validation_data: Any, model: Any) -> Feed | None:
    """Validation data are scored as given (``fit``'s transform does not apply; a Source's
    own does)."""
    if validation_data is None:
        return None
    source = validation_data if isinstance(validation_data, Source) else Source(validation_data)
    values = as_data(source.data, model, name="validation_data")
    return Feed(values, None, source.transform, "validation_data", values.num_points)


def _compose(
    first: Callable[[Any], Any] | None, then: Callable[[Any], Any] | None
) -> Callable[[Any], Any] | None:
    """``first`` and then ``then`` (each may be None), in the data's own form."""
    if first is None or then is None:
        return first or then

    def both(batch: Any) -> Any:
        return then(first(batch))

    return both


# -- devices and failures ---------------------------------------------------------------------


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


def cuda_devices() -> list[int]:
    """Every visible CUDA device, for ``torch.random.fork_rng`` (none without CUDA)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
