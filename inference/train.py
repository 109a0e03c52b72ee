"""The one training loop: SVI on any Pyro model/guide pair.

``fit`` checks its options, builds the pair's :class:`~lvmkit.inference.step.Trainer` (the loss,
its parameters, the optimizer: :mod:`lvmkit.inference.step`), and runs epochs of
:meth:`Trainer.step` over minibatches taken by index from data already on the device (no
DataLoader). Around the step, as separate pieces: the check points (one host sync each: the
running loss and a finiteness check, at every epoch's end and every ``checkpoint_every``
steps), where the run's state is snapshotted and written to the run directory
(:mod:`~lvmkit.inference._rundir`); the rollback, location and lr reduction when a value turned
non-finite (:mod:`~lvmkit.inference._recovery`); callbacks; several processes
(:mod:`~lvmkit.inference._distributed`). ``resume=True`` continues from the last checkpoint and
ends with the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.infer
import torch
from torch import nn
from tqdm.auto import tqdm

from lvmkit.inference import _distributed, _memory, _recovery
from lvmkit.inference._data import (
    Data,
    Feed,
    as_data,
    check_with_model,
    feeds,
    resolve_device,
)
from lvmkit.inference._data import Source as DataSource
from lvmkit.inference._params import param_scope
from lvmkit.inference._rundir import RunDir, history_columns, rng_state, set_rng_state
from lvmkit.inference.annealing import KLSchedule, LatentScale
from lvmkit.inference.callbacks import FitInfo, check_callbacks, notify
from lvmkit.inference.evaluate import mean_elbo
from lvmkit.inference.optim import OptimSpec
from lvmkit.inference.step import Trainer, prepare
from lvmkit.inference.threads import using as using_threads
from lvmkit.models._checks import check_choice, check_int

NONFINITE_POLICIES = _recovery.NONFINITE_POLICIES
LR_REDUCTION = _recovery.LR_REDUCTION  # on_nonfinite="reduce_lr": lr × this per rollback
MAX_LR_REDUCTIONS = _recovery.MAX_LR_REDUCTIONS  # ... at most this many times
NonFiniteLossError = _recovery.NonFiniteLossError


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns.

    ``model`` and ``guide`` are the objects passed in, trained in place and on ``device``;
    ``params`` maps a name to every trained tensor (module parameters under ``model.``/``guide.``,
    ``pyro.param`` sites under their own names); ``history`` has one row per epoch with columns
    ``epoch``, ``train_loss`` (negative ELBO per data point), ``val_elbo`` (when validation data
    were given), ``lr``, ``seconds`` and ``examples_per_s``; ``compiled`` says whether the steps
    ran through the traced loss (False when not asked for, or after a fallback).
    """

    model: Callable[..., Any]
    guide: Callable[..., Any]
    history: pd.DataFrame
    params: dict[str, torch.Tensor]
    device: torch.device
    run_dir: Path | None
    compiled: bool = False
    stopped_early: bool = False  # a callback (e.g. EarlyStopping) ended training before ``epochs``


def fit(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    data: Any,
    *,
    epochs: int = 10,
    batch_size: int | None = 128,
    lr: float | None = None,
    optimizer: Any = None,
    optimizer_args: dict[str, Any] | None = None,
    scheduler: Any = None,
    scheduler_args: dict[str, Any] | None = None,
    scheduler_interval: str = "epoch",
    clip_norm: float | None = None,
    objective: str | pyro.infer.ELBO = "elbo",
    num_particles: int = 1,
    seed: int | None = 0,
    device: str | torch.device = "auto",
    validation_data: Any = None,
    transform: Callable[[Any], Any] | None = None,
    data_plate: str | None = None,
    vectorize_particles: bool | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    metadata: dict[str, Any] | None = None,
    validate: bool = False,
    compile: bool | None = None,
    checkpoint_every: int | None = None,
    on_nonfinite: str = "raise",
    memory_budget: int | str | None = None,
    kl_schedule: KLSchedule | None = None,
    callbacks: list[Any] | None = None,
    progress: bool = True,
    threads: int | str | None = "auto",
) -> FitResult:
    """Train ``model``/``guide`` by stochastic variational inference.

    Args:
        model, guide: a Pyro model and guide taking the same arguments: PyroModules (parameters
            in the module), plain functions or methods that register networks with
            ``pyro.module``, autoguides.
        data: the model's arguments, as Pyro's ``svi.step(...)`` takes them: a tensor (passed
            as ``x`` when the model has a parameter of that name, else first), a tuple of
            positional arguments, or a dict of keyword arguments. Tensors are per point and cut
            into minibatches along their first dimension; other values (ints, namespaces,
            modules) are passed unchanged to every call. A list of :class:`lvmkit.Source`
            trains on several data sets at once, each step calling the pair on one minibatch of
            each and summing the losses (labelled and unlabelled data, say).
        epochs: total epochs; with ``resume=True`` training continues up to this number.
        batch_size: points per minibatch; ``None``: the whole data every step (one step per
            epoch), for models that subsample themselves or read their data whole.
        lr: the learning rate (default: the optimizer's own; 1e-3 for the default Adam).
        optimizer: ``None`` (fused Adam), a ``torch.optim`` class or factory (with
            ``optimizer_args``), or a ``pyro.optim`` optimizer or scheduler (``ClippedAdam``
            and its ``clip_norm``/``lrd`` included). See :mod:`lvmkit.inference.optim`.
        scheduler, scheduler_args, scheduler_interval: a ``torch.optim.lr_scheduler`` class or
            factory and its arguments, stepped each ``"epoch"`` or each ``"step"``.
        clip_norm: clip the norm of all gradients together to this before each update.
        objective: ``"elbo"`` (Trace_ELBO), ``"mean_field"`` (analytic KL), ``"iwae"`` (the
            importance-weighted bound), ``"rws"`` (reweighted wake-sleep), or a Pyro ELBO
            (e.g. ``TraceEnum_ELBO`` for discrete latents the guide enumerates).
        num_particles: samples of z per data point in the objective; the K of ``"iwae"`` and
            ``"rws"``. Drawn in one vectorised pass where the model broadcasts over an extra
            leftmost dimension, one by one where it does not (``vectorize_particles``).
        seed: seeds Pyro, torch, numpy and ``random`` once the pair is set up; with the same
            seed, the same initial modules and the same device, the same numbers come out.
            ``None`` leaves the random state as you set it (Pyro's behaviour). Either way,
            guides that initialise lazily (autoguides) are initialised from your random state,
            on the first minibatch, as Pyro's first step would.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``. Modules and data are moved.
        validation_data: like ``data`` (or a :class:`lvmkit.Source` with its own transform);
            its one-sample ELBO per point is logged each epoch, scored as given (``transform``
            does not apply to it).
        transform: applied to each minibatch on the device before the model sees it, e.g.
            :func:`lvmkit.data.binarize` for dynamic binarization; it gets what ``data`` is (a
            tensor, tuple or dict) and returns the model's arguments in the same conventions.
        data_plate: the name of the plate over the data points (default: ``"data"`` where
            there is one, else found), used to report ``train_loss`` per point.
        vectorize_particles: see ``num_particles``; ``None`` detects it.
        run_dir: folder for ``config.json``, ``history.csv`` and ``checkpoint.pt`` (written
            after every epoch, checksummed, the one before kept as ``checkpoint.prev.pt``); locked
            against a second process while ``fit`` runs.
        resume: continue the run in ``run_dir`` from its checkpoint (mid-epoch ones included).
        metadata: JSON-serialisable facts stored in ``config.json`` (e.g. the model config).
        validate: keep Pyro's validation on after the first step (slower).
        compile: trace the ``"elbo"`` loss with the PyTorch JIT, once per argument shape
            (:mod:`lvmkit.inference.compiled`); for models whose structure is the same every
            step. A model that cannot be traced trains uncompiled, with a warning saying why.
            ``None`` (default): compile when the objective is ``"elbo"`` with one particle and
            no KL warm-up, and model and guide declare ``static_structure = True`` (the
            built-in VAE and encoder do); user models stay uncompiled unless asked, since
            tracing would freeze data-dependent control flow without a word.
        checkpoint_every: also check and checkpoint every this many steps inside an epoch
            (``None``: at epoch ends only). Each check point costs one host sync.
        on_nonfinite: what to do when the loss, a gradient or a parameter turns NaN/inf — found
            at the next check point, without a per-step sync. Either way the loop first rolls
            back to the last good check point and replays the steps since, to find the epoch,
            step and sample site where it appeared. ``"raise"``: raise
            :class:`NonFiniteLossError` naming them. ``"reduce_lr"``: halve the learning rates,
            warn, and continue (at most five times).
        memory_budget: bytes (or a size such as ``"4GiB"``) one training step may use, data
            included; ``None``: 90 % of the memory free on the device. The first step's
            activations are measured; a step that would not fit is refused before training
            starts, with the ``batch_size`` that would fit.
        kl_schedule: a :class:`lvmkit.KLSchedule` weighting the latent sites (β-VAE, KL
            warm-up); the weight is logged per epoch as ``kl_weight`` and ``train_loss`` is the
            weighted objective, while ``val_elbo`` stays the unweighted ELBO.
        callbacks: objects with ``on_epoch_end`` and friends (:class:`lvmkit.Callback`).
        progress: show a tqdm progress bar.
        threads: CPU threads for torch's operators during the fit: ``"auto"`` (the CPUs this
            process may use, less those other work keeps busy; a count you set yourself is kept),
            an int, or ``None`` (leave torch alone). See :mod:`lvmkit.inference.threads`;
            recorded in the run's ``config.json``.

    ``train_loss`` is the objective per data point: the epoch's summed step losses over the
    points they stand for (a minibatch of n counts N when the model's data plate scales it up to
    N; a ``poutine.scale`` on a site does not change the count). A model or guide with an
    ``adversary`` attribute (an ``nn.Module``, e.g. the AAE's discriminator) gets that module's
    parameters in a parameter group of their own with learning rate ``adversary_lr``. Modules
    are put in training mode for the steps and in eval mode for validation and evaluation.

    Example::

        >>> import torch, lvmkit
        >>> config = lvmkit.VAEConfig(data_dim=4, latent_dim=2, hidden_dims=(8,))
        >>> model, guide = lvmkit.build_vae(config)
        >>> x = torch.bernoulli(torch.full((64, 4), 0.3))
        >>> result = lvmkit.fit(model, guide, x, epochs=2, device="cpu", progress=False)
        >>> list(result.history.epoch)
        [1, 2]
    """
    epochs = check_int("epochs", epochs)
    batch_size = check_int("batch_size", batch_size) if batch_size is not None else None
    seed = check_int("seed", seed, minimum=0) if seed is not None else None
    _check_options(
        model, guide, resume=resume, validate=validate, progress=progress, run_dir=run_dir,
        metadata=metadata, transform=transform, data_plate=data_plate,
        vectorize_particles=vectorize_particles, on_nonfinite=on_nonfinite,
        kl_schedule=kl_schedule, memory_budget=memory_budget, compile=compile,
    )  # fmt: skip
    options = _LoopOptions(
        transform=transform,
        validate=validate,
        checkpoint_every=check_int("checkpoint_every", checkpoint_every)
        if checkpoint_every is not None
        else None,
        on_nonfinite=on_nonfinite,
        data_plate=data_plate,
        kl_schedule=kl_schedule,
        scaler=LatentScale() if kl_schedule is not None else None,
        callbacks=check_callbacks(callbacks),
    )
    optim = OptimSpec(
        optimizer, dict(optimizer_args or {}), lr, scheduler, dict(scheduler_args or {}),
        scheduler_interval, clip_norm,
    )  # fmt: skip
    distributed = _distributed.wanted()
    annealed = kl_schedule is not None and not kl_schedule.constant
    compile = _check_compile(compile, distributed, objective, num_particles, annealed, model, guide)
    train = feeds(data, model, batch_size)
    val = _validation(validation_data, model)
    for f in [*train, *([val] if val else [])]:
        check_with_model(model, f.data)
    if distributed and (len(train) > 1 or train[0].shares is not None):
        raise ValueError(
            "several data sources (a list of lvmkit.Source) are not supported with several "
            "processes (torchrun) yet; train in one process, or on one source"
        )
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir: the folder holding checkpoint.pt")
    dev = resolve_device(device)
    world = _distributed.SINGLE
    if distributed:
        world, dev = _distributed.join(dev)
    data_bytes = _memory.tensor_bytes(
        [t for f in [*train, *([val] if val else [])] for t in f.data.tensors()]
    )
    if dev.type != "cpu":  # on the CPU the data are in memory already
        _memory.check_data(data_bytes, memory_budget, dev)
    for obj in (model, guide):
        if isinstance(obj, nn.Module):
            obj.to(dev)
            obj.train()
    for f in [*train, *([val] if val else [])]:
        f.data = f.data.to(dev)
    if options.scaler is not None:  # a constant weight is set once here, a warm-up every step
        options.scaler.weight = options.kl_schedule.weight(0.0)  # type: ignore[union-attr]

    with (
        using_threads(threads) as threads_used,
        _RunFiles(run_dir, resume, world) as files,
        param_scope(model, guide, publish=True),
    ):
        trainer = prepare(
            model, guide, train, objective=objective, num_particles=num_particles, optim=optim,
            device=dev, compile=compile, scaler=options.scaler, transform=transform,
            data_plate=data_plate, vectorize_particles=vectorize_particles,
            memory_budget=memory_budget, data_bytes=data_bytes,
        )  # fmt: skip
        if seed is not None:
            pyro.set_rng_seed(seed + world.rank)  # each process its own draws
        order_seed = seed if seed is not None else int(torch.randint(2**31 - 1, ()).item())
        settings = {
            "objective": objective if isinstance(objective, str) else type(objective).__name__,
            "num_particles": num_particles,
            "batch_size": batch_size,
            "lr": trainer.optim.lr,
            "seed": order_seed,
            "compile": bool(compile),
            "kl_schedule": kl_schedule.to_dict() if kl_schedule is not None else None,
            "world_size": world.size,
            "num_points": train[0].num_points,
            **optim.describe(),
            **({"sources": [f.name for f in train]} if len(train) > 1 else {}),
            "threads": threads_used.threads if threads_used is not None else None,
        }
        val_total = 0
        if val is not None and world.distributed:  # each process scores its share
            val_total = val.data.check_sliceable("validation_data")
            share = torch.arange(world.rank, val_total, world.size, device=dev)
            val.data = val.data.take(share)
        if not world.main:
            options = replace(options, callbacks=[])
        loop = _Loop(
            trainer, train, model, guide, options, seed=order_seed, dev=dev, world=world,
            run=files.run, val=val, val_total=val_total,
        )  # fmt: skip
        files.open(loop, settings, metadata, keep_seed=seed is None)
        if world.distributed:
            trainer.distribute(world, dev)
        columns = history_columns(val is not None, kl_schedule is not None)
        info = FitInfo(
            settings, dict(metadata or {}), epochs, files.path, loop.progress.history, world.size
        )
        notify(options.callbacks, "on_fit_start", info)
        try:
            loop.run(epochs, progress=progress and world.main)
        except BaseException as err:
            history = pd.DataFrame(loop.progress.history, columns=columns)
            notify(options.callbacks, "on_fit_end", history, err)
            raise
    history = pd.DataFrame(loop.progress.history, columns=columns)
    notify(options.callbacks, "on_fit_end", history, None)
    compiled = trainer.compiled is not None and trainer.compiled.failure is None
    return FitResult(
        model,
        guide,
        history,
        dict(trainer.params),
        dev,
        files.path,
        compiled,
        stopped_early=loop.stopped,
    )


def _check_options(model, guide, **options: Any) -> None:
    """fit's options that need no more than a type or range check."""
    for flag in ("resume", "validate", "progress"):
        if not isinstance(options[flag], bool):
            raise TypeError(f"{flag} must be True or False; got {options[flag]!r}")
    run_dir, metadata = options["run_dir"], options["metadata"]
    if run_dir is not None and not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"run_dir must be a str or os.PathLike; got {type(run_dir).__name__}")
    if metadata is not None:
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as err:
            raise TypeError(f"metadata must be a JSON-serialisable dict: {err}") from err
    for name, obj in (("model", model), ("guide", guide)):
        if not callable(obj):
            raise TypeError(f"{name} must be a Pyro {name} (a callable); got {type(obj).__name__}")
    transform, plate = options["transform"], options["data_plate"]
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable or None; got {type(transform).__name__}")
    if plate is not None and not isinstance(plate, str):
        raise TypeError(f"data_plate must be a plate's name (a str) or None; got {plate!r}")
    for name in ("vectorize_particles", "compile"):
        if options[name] is not None and not isinstance(options[name], bool):
            raise TypeError(f"{name} must be True, False or None (auto); got {options[name]!r}")
    check_choice("on_nonfinite", options["on_nonfinite"], NONFINITE_POLICIES)
    schedule = options["kl_schedule"]
    if schedule is not None and not isinstance(schedule, KLSchedule):
        raise TypeError(
            f"kl_schedule must be a lvmkit.KLSchedule or None; got {type(schedule).__name__}"
        )
    _memory.parse_budget(options["memory_budget"])


class _RunFiles:
    """The run directory of a fit (when it has one): opened and locked on entry (by rank 0; the
    other processes only read its checkpoint to resume), closed on exit, and — on any failure
    while setting up — every process told, so that none waits for the others."""

    def __init__(self, run_dir: Any, resume: bool, world: _distributed.World) -> None:
        self.run_dir, self.resume, self.world = run_dir, resume, world
        self.run: RunDir | None = None
        self.reader: RunDir | None = None

    @property
    def path(self) -> Path | None:
        return self.run.path if self.run is not None else None

    def __enter__(self) -> _RunFiles:
        try:
            if self.run_dir is not None and self.world.main:
                self.run = RunDir(self.run_dir, resume=self.resume)
            elif self.run_dir is not None and self.resume:
                self.reader = RunDir(self.run_dir, resume=True, read_only=True)
        except BaseException:
            _distributed.agree(self.world, False, "set-up")
            _distributed.leave(self.world)
            raise
        return self

    def open(self, loop: _Loop, settings: dict[str, Any], metadata, *, keep_seed: bool) -> None:
        """Start the run's files, or restore ``loop`` from its checkpoint when resuming (a run
        started with ``seed=None`` goes on with the seed it drew)."""
        source = self.run if self.run is not None else self.reader
        shapes = {k: tuple(v.shape) for k, v in loop.trainer.params.items()}
        try:
            if self.resume and source is not None:
                loop.restore(source.load({**settings, "seed": None} if keep_seed else settings,
                                         shapes))  # fmt: skip
                if keep_seed:
                    loop.seed = settings["seed"] = int(source.settings["seed"])
            elif self.run is not None:
                self.run.start(settings, metadata)
        except BaseException:
            _distributed.agree(self.world, False, "set-up")
            raise
        _distributed.agree(self.world, True, "set-up")

    def __exit__(self, *exc: object) -> None:
        if self.run is not None:
            self.run.close()
        _distributed.leave(self.world)


def _check_compile(compile, distributed, objective, num_particles, annealed, model, guide) -> bool:
    """compile=True/False/None (auto) against the other options."""
    if compile and distributed:
        raise ValueError(
            "compile=True is not supported with several processes (torchrun): "
            "DistributedDataParallel wraps the eager loss; use compile=False"
        )
    if compile is None:
        return (
            not distributed
            and objective == "elbo"
            and not annealed
            and num_particles == 1
            and all(getattr(obj, "static_structure", False) is True for obj in (model, guide))
        )
    if compile and objective != "elbo":
        raise ValueError(
            f"compile=True traces the 'elbo' objective only; got objective={objective!r} "
            "(use objective='elbo', or compile=False)"
        )
    if compile and num_particles != 1:
        raise ValueError(
            f"compile=True traces a one-particle loss; got num_particles={num_particles} "
            "(use compile=False, which vectorises the particles)"
        )
    if compile and annealed:
        raise ValueError(
            "compile=True freezes the KL weight into the traced graph, but kl_schedule changes it "
            "every step (warmup_epochs > 0): use compile=False, or a constant schedule"
        )
    return bool(compile)


def _validation(validation_data: Any, model: Any) -> Feed | None:
    if validation_data is None:
        return None
    if isinstance(validation_data, DataSource):
        source = validation_data
        values = as_data(source.data, model, name="validation_data")
        return Feed(values, None, source.transform, "validation_data", values.num_points)
    values = as_data(validation_data, model, name="validation_data")
    return Feed(values, None, None, "validation_data", values.num_points)


def epoch_order(seed: int, epoch: int, n: int, *, source: int = 0, cycle: int = 0) -> torch.Tensor:
    """The order in which one pass of an epoch takes a source's points: a function of the seed,
    the epoch, the source and the pass only, so that resume replays it."""
    key = [seed, epoch] if source == 0 and cycle == 0 else [seed, epoch, source, cycle]
    state = int(np.random.SeedSequence(key).generate_state(1)[0])
    return torch.randperm(n, generator=torch.Generator().manual_seed(state))


@dataclass(frozen=True)
class _LoopOptions:
    """How the loop runs around its steps (fit's options of the same names)."""

    transform: Callable[[Any], Any] | None
    validate: bool  # Pyro's validation after the first step too
    checkpoint_every: int | None  # steps between check points inside an epoch
    on_nonfinite: str
    data_plate: str | None
    kl_schedule: KLSchedule | None
    scaler: LatentScale | None  # applies the schedule's weight to the latent sites
    callbacks: list[Any]


@dataclass
class Progress:
    """Where a run stands: with the trainer's parameters and optimizer, what a checkpoint
    holds (see :meth:`_Loop.snapshot`)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed in epoch ``epoch + 1``
    running: torch.Tensor | None = None  # this epoch's summed step losses, on the device
    running_value: float = 0.0  # ``running`` as last read on the host (summed over processes)
    elapsed: float = 0.0  # seconds spent in this epoch's steps
    history: list[dict[str, float]] = field(default_factory=list)
    lr_reductions: int = 0


class _Loop:
    """Epochs of steps, and the check points around them (see the module docstring)."""

    def __init__(
        self,
        trainer: Trainer,
        feeds: list[Feed],
        model: Any,
        guide: Any,
        options: _LoopOptions,
        *,
        seed: int,
        dev: torch.device,
        world: _distributed.World,
        run: RunDir | None,
        val: Feed | None,
        val_total: int,
    ) -> None:
        self.trainer, self.feeds, self.options = trainer, feeds, options
        self.model, self.guide = model, guide  # as given: validation scores the true ELBO
        self.seed, self.dev, self.world, self.rundir = seed, dev, world, run
        self.val, self.val_total = val, val_total
        self.kl_weight: float | None = None  # at the last step
        self.stopped = False  # a callback asked to stop
        # steps an epoch: as many as the source that needs most (a shard of it per process)
        self.steps_per_epoch = max(self._steps(f) for f in feeds)
        self.total = sum(f.num_points or 1 for f in feeds)  # points of an epoch, all processes
        self.represented = self._represented()  # what an epoch's losses stand for, per process
        self.progress = Progress(running=torch.zeros((), device=dev))
        self.orders: dict[tuple[int, int], torch.Tensor] = {}  # this epoch's: (source, pass)
        self.good: dict[str, Any] = {}  # the last snapshot: where a rollback returns to

    def _steps(self, feed: Feed) -> int:
        """Steps to pass one source once (its shard of the points, under several processes)."""
        if feed.batch_size is None or feed.shares is not None:
            return feed.steps
        shard = _distributed.shard_size(self.world, feed.num_points or 1)
        return -(-shard // int(feed.batch_size))

    def _represented(self) -> float:
        """Points an epoch's summed losses stand for, on one process."""
        total = 0.0
        for source in self.trainer.sources:
            feed = source.feed
            for step in range(self.steps_per_epoch):
                points = self._batch_points(feed, step)
                total += source.represented(points) if points else 0.0
        return total

    def _batch_points(self, feed: Feed, step: int) -> int:
        if feed.batch_size is None:
            return feed.num_points or 1
        n = _distributed.shard_size(self.world, feed.num_points or 1)
        start, stop = feed.bounds(step % self._steps(feed), n)
        return stop - start

    # -- state --------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The run's whole state: what a checkpoint holds and a rollback returns to."""
        p, optim = self.progress, self.trainer.optim
        state = {
            "epoch": p.epoch,
            "step": p.step,
            "running": p.running_value,
            "elapsed": p.elapsed,
            "lr": optim.lr,
            "lr_reductions": p.lr_reductions,
            "params": {k: v.detach().cpu().clone() for k, v in self.trainer.params.items()},
            "optimizer": _cpu(optim.optimizer.state_dict()),
            "scheduler": _cpu(optim.scheduler.state_dict()) if optim.scheduler else None,
            "rng": rng_state(self.dev),
            "history": [dict(row) for row in p.history],
        }
        if self.world.distributed:  # each process's random state and share of the running loss
            own = {"rng": rng_state(self.dev), "running": float(p.running)}  # type: ignore[arg-type]
            state["ranks"] = _distributed.gather(self.world, own)
        return state

    def restore(self, state: dict[str, Any]) -> None:
        p, optim = self.progress, self.trainer.optim
        with torch.no_grad():
            for name, value in state["params"].items():
                self.trainer.params[name].copy_(value)
        optim.load_state_dict(
            {"optimizer": _copy(state["optimizer"]), "scheduler": _copy(state.get("scheduler"))}
        )
        p.epoch, p.step = int(state["epoch"]), int(state["step"])
        own = state["ranks"][self.world.rank] if "ranks" in state else state  # distributed: its own
        p.running_value = float(state["running"])
        p.running = torch.tensor(float(own["running"]), device=self.dev)
        p.elapsed = float(state["elapsed"])
        p.lr_reductions = int(state["lr_reductions"])
        p.history = [dict(row) for row in state["history"]]
        set_rng_state(own["rng"], self.dev)
        self.orders = {}
        self.good = state

    # -- the loop -----------------------------------------------------------------------------

    def run(self, epochs: int, *, progress: bool) -> None:
        p = self.progress
        if not self.good:
            self.good = self.snapshot()  # where a non-finite first check point rolls back to
        bar = tqdm(
            total=max(0, (epochs - p.epoch) * self.steps_per_epoch - p.step),
            disable=not progress,
            unit="step",
            desc="fit",
            dynamic_ncols=True,
        )
        try:
            self._epochs(epochs, bar)
        finally:  # (an interrupt, too: the bar is done before anyone says why)
            bar.close()

    def _epochs(self, epochs: int, bar) -> None:
        p = self.progress
        first_step = True
        while p.epoch < epochs and not self.stopped:
            tic = time.perf_counter()
            rolled_back = False
            while p.step < self.steps_per_epoch:
                with pyro.validation_enabled(self.options.validate or first_step):
                    loss = self.trainer.step(self.calls())
                p.running = loss if p.running is None else p.running + loss
                first_step = False
                p.step += 1
                bar.update(1)
                end = p.step == self.steps_per_epoch
                every = self.options.checkpoint_every
                if end or (every and p.step % every == 0):
                    p.elapsed += time.perf_counter() - tic
                    if not self._finite():
                        _recovery.recover(self)
                        rolled_back = True
                        break
                    if end:
                        self._end_epoch(bar)
                    self._check_point()
                    if end:
                        row = dict(p.history[-1])
                        replies = notify(self.options.callbacks, "on_epoch_end", p.epoch, row)
                        stop = any(reply is True for reply in replies)  # (rank 0's callbacks)
                        self.stopped = _distributed.any_rank(self.world, stop)
                        break
                    tic = time.perf_counter()
            if rolled_back:
                bar.reset(total=(epochs - p.epoch) * self.steps_per_epoch - p.step)

    def calls(self) -> list[Data]:
        """This step's minibatches, one per source, ready for the model (the KL weight set)."""
        p = self.progress
        schedule, scaler = self.options.kl_schedule, self.options.scaler
        if schedule is not None and scaler is not None:
            self.kl_weight = schedule.weight(p.epoch + p.step / self.steps_per_epoch)
            scaler.weight = self.kl_weight
        out = []
        for index, feed in enumerate(self.feeds):
            steps = self._steps(feed)
            order = self._order(index, feed, p.step // steps) if feed.batch_size else None
            batch = feed.batch(order, p.step % steps)
            if batch is not None:  # (an even share may leave a source out of a step)
                out.append(feed.prepare(batch, self.options.transform))
        return out

    def _order(self, index: int, feed: Feed, cycle: int) -> torch.Tensor:
        key = (index, cycle)
        if key not in self.orders:
            epoch, n = self.progress.epoch + 1, feed.num_points or 1
            if self.world.distributed:
                order = _distributed.epoch_order(self.world, self.seed, epoch, n)
            else:
                order = epoch_order(self.seed, epoch, n, source=index, cycle=cycle)
            self.orders[key] = order.to(self.dev)
        return self.orders[key]

    def _finite(self) -> bool:
        """One host sync: read the running loss, and check it and every parameter are finite."""
        p = self.progress
        params = list(self.trainer.params.values())
        finite = torch.stack([torch.isfinite(t).all() for t in params]).all()
        running = p.running
        assert running is not None
        bad = (~finite).to(running.dtype)
        summed = _distributed.all_sum(self.world, torch.stack([running, bad]))
        value, bad_ranks = summed.tolist()  # the one host sync
        p.running_value = value  # summed over the processes
        return not bad_ranks and math.isfinite(value)

    def _end_epoch(self, bar) -> None:
        p, world = self.progress, self.world
        # step losses are summed over the processes, each multiplied by their number (so that
        # DDP's averaged gradient is the whole effective batch's): undo both
        per_point = p.running_value / (self.represented * world.size * world.size)
        row: dict[str, float] = {"epoch": p.epoch + 1, "train_loss": per_point}
        if self.kl_weight is not None:
            row["kl_weight"] = self.kl_weight  # at the epoch's last step
        if self.val is not None:
            row["val_elbo"] = self._val_elbo()
        optim = self.trainer.optim
        row.update(lr=optim.last_lr, seconds=p.elapsed, examples_per_s=self.total / p.elapsed)
        optim.end_epoch(row)  # a per-epoch schedule moves the lr for the next epoch
        p.history.append(row)
        bar.set_postfix({k: f"{v:.2f}" for k, v in row.items() if k in ("train_loss", "val_elbo")})
        p.epoch, p.step, self.orders = p.epoch + 1, 0, {}
        p.running = torch.zeros((), device=self.dev)
        p.running_value = 0.0
        p.elapsed = 0.0

    def _val_elbo(self) -> float:
        """The one-sample validation ELBO per point (unweighted by any KL schedule); each
        process scores its share."""
        val = self.val
        assert val is not None
        local = mean_elbo(
            self.model, self.guide, val.data, plate=self.options.data_plate, transform=val.transform
        )
        if not self.world.distributed:
            return float(local)
        total = _distributed.all_sum(self.world, local * (val.data.num_points or 1))
        return float(total) / self.val_total

    def _check_point(self) -> None:
        """Snapshot the state as the one to roll back to; write it to the run directory."""
        p = self.progress
        self.good = self.snapshot()
        if self.rundir is not None:
            self.rundir.save(self.good)
            notify(self.options.callbacks, "on_checkpoint", self.rundir.checkpoint, p.epoch, p.step)


def _cpu(obj: Any) -> Any:
    """A nested structure with every tensor moved to the CPU (checkpoints load on any device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj


def _copy(obj: Any) -> Any:
    return _cpu(obj) if obj is not None else None
