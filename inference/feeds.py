"""The data's one trip: :func:`load` turns what ``fit`` is given into :class:`Feeds` — one
:class:`Feed` per data source (and one for the validation data), checked, placed on the run's
device and memory-checked once.

Several data sets with their own minibatch sizes go into one ``fit`` as a list of :class:`Source`
(e.g. M2's labelled and unlabelled images): each step calls the pair once per source, or one
source a step in the order of Pyro's semi-supervised loops (:class:`Interleaved`).
:class:`Source` is the user's description of a data set; :class:`Feed` is the loop's;
:class:`lvmkit.inference.calls.Data` is one call's arguments.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lvmkit.inference import _memory
from lvmkit.inference.calls import Data, as_data, check_with_model, from_transform
from lvmkit.inference.devices import (
    Placement,
    move_pair,
    place,
)

AUTO = "auto"  # Source(batch_size="auto"): the source's share of each step (see Source)


# -- the model's signature ----------------------------------------------------------------------


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
    ``validate_data`` too), placed by the device policy (:func:`~lvmkit.inference.devices.place`:
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
