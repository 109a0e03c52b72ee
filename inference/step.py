"""One SVI step, and what a training run builds before its first one.

:func:`prepare` turns a model/guide pair, its data and fit's options into a :class:`Trainer`:
the objective's loss on one minibatch of each data source, the parameters it trains (found by
running the loss once, which also initialises lazily built guides, from the caller's random
state), the optimizer with its schedule, each source's layout (its data plate and scale), and —
when compiling — the :class:`~lvmkit.inference.compiled.CompiledStep`. :meth:`Trainer.step` is
the whole of a training step:

    compiled(call)  # loss, gradients, clipping and the update as one compiled function
    # or, eagerly:
    loss = trainer.loss(calls); zero_grad; loss.backward(); clip; optimizer.step(); schedule

``fit`` calls it in its loop, and ``lvmkit bench speed`` times exactly it. Pyro's ``SVI.step``
and NumPyro's ``SVI.update`` are the models.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.infer
import pyro.poutine as poutine
import torch

from lvmkit.inference import _memory, distributed
from lvmkit.inference.annealing import LatentScale
from lvmkit.inference.calls import (
    Data,
    check_signature,
    cuda_devices,
    model_failures_as_data_errors,
)
from lvmkit.inference.compiled import CompiledStep
from lvmkit.inference.feeds import Feed
from lvmkit.inference.kernel import Layout, paired_traces
from lvmkit.inference.layout import broadcasts, layout_of, note_sequential, whole_layout
from lvmkit.inference.objectives import PerPointBound, make_objective
from lvmkit.inference.optim import Optim, OptimSpec, build
from lvmkit.inference.params import collect_params, eval_mode


@dataclass
class Trainer:
    """What a training step uses: the loss of one minibatch per source, the parameters it
    trains, and the optimizer (with schedule and clipping) that updates them."""

    loss: Callable[[list[Data]], torch.Tensor]
    params: dict[str, torch.Tensor]
    optim: Optim
    feeds: list[Feed]  # the data, each with its layout: the one owner the loop reads
    objective: pyro.infer.ELBO
    scored: tuple[Any, Any]  # the pair as the loss sees it (latent sites weighted by a schedule)
    compiled: CompiledStep | None = None
    active: dict[str, Any] = field(default_factory=dict)  # the loss module, DDP's factor

    def step(self, calls: list[Data]) -> torch.Tensor:
        """One SVI step; returns the loss as a device tensor (no host sync)."""
        if self.compiled is not None and len(calls) == 1:
            compiled = self.compiled(calls[0])
            if compiled is not None:
                return compiled
        loss = self.loss(calls)
        self.optim.zero_grad()
        loss.backward()
        self.optim.step()
        return loss.detach()

    def distribute(self, world: distributed.World, dev: torch.device) -> None:
        """Wrap the loss for several processes: DDP (or gradient averaging for plain pairs),
        each process's loss multiplied by their number so that the averaged gradient is the
        gradient of the loss summed over every process's minibatch."""
        self.active["loss"], average = distributed.wrap_loss(
            world, self.active["loss"], self.params, dev
        )
        self.active["factor"] = world.size
        if average:
            params = list(self.params.values())
            self.optim.before_step = lambda: distributed.average_grads(world, params)

    def undistribute(self, world: distributed.World) -> None:
        """Drop the DDP wrapper while the process group still lives (see
        :func:`lvmkit.inference.distributed.unwrap_loss`)."""
        wrapped = self.active["loss"]
        self.active["loss"] = distributed.unwrap_loss(world, wrapped)
        del wrapped
        gc.collect()  # (DDP's reducer freed now, while the process group is registered)


def prepare(
    model: Any,
    guide: Any,
    feeds: list[Feed],
    *,
    objective: str | pyro.infer.ELBO = "elbo",
    num_particles: int = 1,
    optim: OptimSpec | None = None,
    compile: bool | None = False,
    scaler: LatentScale | None = None,
    data_plate: str | None = None,
    vectorize_particles: bool | None = None,
    memory_budget: Any = None,
    data_bytes: int = 0,
) -> Trainer:
    """Build the :class:`Trainer` of a pair on its data sources (see the module docstring).

    Runs inside the caller's ``param_scope``, on the feeds' placement (:func:`lvmkit.inference.
    feeds.load`): with an explicit device, the networks and ``pyro.param`` tensors the set-up step
    meets are moved there as they are first used, and every call of the model and guide runs
    with it as torch's default device. The set-up step runs from the caller's random state and
    leaves it as it was: lazily initialised guides (autoguides, ``init_loc_fn``) are initialised
    on the first minibatch, as by Pyro's own first step, and whatever seeding the caller did
    holds.
    """
    placement = feeds[0].placement
    dev = placement.device
    scored = (scaler(model), scaler(guide)) if scaler is not None else (model, guide)
    by_name = not isinstance(objective, pyro.infer.ELBO)
    vectorize = vectorize_particles is not False

    def objective_module(vectorized: bool) -> tuple[pyro.infer.ELBO, Any]:
        elbo = make_objective(objective, num_particles=num_particles, vectorize=vectorized)
        if isinstance(elbo, PerPointBound):  # finds its plate and particles as evaluate does
            elbo.data_plate, elbo.vectorize = data_plate, vectorize_particles
        return elbo, elbo(*scored)

    elbo, module = objective_module(vectorize)
    active: dict[str, Any] = {"loss": module, "factor": 1}

    def eager(call: Data) -> torch.Tensor:
        with placement.scope():
            return active["loss"](*call.args, **call.kwargs)

    def loss(calls: list[Data]) -> torch.Tensor:
        total = eager(calls[0])
        for call in calls[1:]:
            total = total + eager(call)
        return total * active["factor"] if active["factor"] != 1 else total

    first = [feed.first() for feed in feeds]
    for feed, call in zip(feeds, first, strict=True):
        check_signature(model, call, name=feed.name)
        check_signature(guide, call, name=feed.name, role="guide")

    def set_up() -> tuple[dict[str, torch.Tensor], int]:
        transformed = any(feed.transform is not None for feed in feeds)
        where = "the first minibatch of data" + (" (after transform)" if transformed else "")
        with (
            torch.random.fork_rng(devices=cuda_devices(placement, *first)),  # the caller's stream
            model_failures_as_data_errors(where, first[0], placement),
            placement.first_use(),
        ):
            found, saved = _memory.measure_saved(
                lambda: collect_params(lambda calls: _sum(map(eager, calls)), first, model, guide)
            )
        return found, _memory.activation_bytes(saved, found.values())

    try:
        params, activations = set_up()
    except Exception:
        # particles drawn in one vectorised pass need a model that broadcasts over them; if the
        # model does not, they are drawn one by one (Pyro's vectorize_particles=False)
        if not (by_name and num_particles > 1 and vectorize and vectorize_particles is None):
            raise
        elbo, active["loss"] = objective_module(False)
        params, activations = set_up()
        note_sequential(model, guide, "its vectorised particles failed on the first minibatch")
    _memory.check_step(
        activations, params.values(), data_bytes if memory_budget is not None else 0,
        memory_budget, dev,
        batch_size=sum(c.num_points or 1 for c in first), num_particles=num_particles,
    )  # fmt: skip
    for feed, call in zip(feeds, first, strict=True):
        with placement.scope():
            feed.layout, points = _layout(model, guide, call, feed, data_plate)
        if feed.num_points is None:
            feed.num_points = points
            if points is None:
                _warn_uncounted(feed)
    if by_name and num_particles > 1 and vectorize_particles is None and vectorize:
        # a model can run with vectorised particles and still compute the wrong thing (a value
        # of plausible shape from indexing a particle-batched tensor): check every site's shape
        # (the probe must not move BatchNorm's statistics)
        with eval_mode(model, guide), placement.scope():
            fits = all(
                broadcasts(model, guide, call, feed.layout)
                for feed, call in zip(feeds, first, strict=True)
                if feed.layout is not None
            )
        if not fits:
            elbo, active["loss"] = objective_module(False)
    for feed in feeds:
        _warn_global_prior(feed)
    placement.say("fit")
    built = build(optim or OptimSpec(), params, model, guide)
    compiled = None
    if compile is not False:
        compiled = CompiledStep(eager, params, built, auto=compile is None)
    return Trainer(
        loss=loss,
        params=params,
        optim=built,
        feeds=feeds,
        objective=elbo,
        scored=scored,
        compiled=compiled,
        active=active,
    )


def _sum(values):
    total = None
    for value in values:
        total = value if total is None else total + value
    return total


def _layout(
    model, guide, call: Data, feed: Feed, plate: str | None
) -> tuple[Layout | None, int | None]:
    """The layout a source's first minibatch shows (one paired trace of it, which neither
    trains nor moves BatchNorm's statistics nor the random state), or None where no plate over
    the points is found: training does not need one, and evaluation says what is missing. Also
    the data plate's size, for data whose points hold no per-point tensor at the top level
    (observations in a dict passed as one argument): the points a loss is divided by, counted
    as ``evaluate`` counts them (:func:`~lvmkit.inference.layout.whole_layout`)."""
    try:
        with (
            torch.no_grad(),
            torch.random.fork_rng(devices=cuda_devices(call)),
            pyro.validation_enabled(False),
            poutine.block(),
            eval_mode(model, guide),
        ):
            traces = paired_traces(model, guide, call)
        layout = layout_of(traces, call.num_points, plate=plate, whole=feed.batch_size is None)
        points = call.num_points
        if points is None:
            whole = whole_layout(traces, plate)
            points = whole.num_points if whole is not None else None
        return layout, points
    except Exception:
        if plate is not None:
            raise
        return None, call.num_points


def _warn_uncounted(feed: Feed) -> None:
    warnings.warn(
        f"fit cannot tell how many data points {feed.name} holds: it has no per-point tensor "
        "at the top level, and the model's observed sites share no plate. The training loss "
        "is reported for the whole data, not per point. Put the observed sites in a plate over "
        "the points (pyro.plate('data', N)), or name it with data_plate=",
        RuntimeWarning,
        stacklevel=4,
    )


def _warn_global_prior(feed: Feed) -> None:
    """Minibatches of a model with global latents whose data plate is not scaled to the data:
    each step counts the global prior once per minibatch."""
    layout = feed.layout
    if layout is None or feed.batch_size is None or feed.num_points is None:
        return
    size = feed.bounds(0, feed.num_points)[1]
    globals_ = layout.model_global_sites
    if not globals_ or size >= feed.num_points or layout.full_size is not None:
        return
    ratio = feed.num_points / size
    warnings.warn(
        f"the model has global latent sites {list(globals_)} outside its data plate "
        f"{layout.plate!r}, but minibatches of {size} of the {feed.num_points} points are not "
        f"scaled up to the data: each epoch counts their prior about {ratio:.0f} times. Give the "
        f"plate the full size (pyro.plate({layout.plate!r}, N, subsample=...) or "
        "poutine.scale(scale=N / n)), or train on the whole data with batch_size=None",
        RuntimeWarning,
        stacklevel=4,
    )
