"""``fit``: SVI on any Pyro model/guide pair.

``fit`` checks its options, loads the data in one trip (:func:`lvmkit.inference.feeds.load`:
checked, placed by the device policy, on the device), builds the pair's
:class:`~lvmkit.inference.step.Trainer` (the loss, its parameters, the optimizer:
:mod:`lvmkit.inference.step`), and runs the :class:`~lvmkit.inference.loop.Loop`: epochs of
:meth:`Trainer.step`, with check points, non-finite recovery, callbacks and several processes
around them. The run directory is :mod:`~lvmkit.inference.rundir`'s; ``resume=True`` continues
from the last checkpoint and ends with the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import pyro
import pyro.infer
import torch
from torch import nn

from lvmkit.base import check_choice, check_int
from lvmkit.inference import _memory, distributed
from lvmkit.inference.annealing import KLSchedule, LatentScale
from lvmkit.inference.callbacks import FitInfo, check_callbacks, notify
from lvmkit.inference.feeds import Feeds, load
from lvmkit.inference.loop import (
    LR_REDUCTION,
    MAX_LR_REDUCTIONS,
    NONFINITE_POLICIES,
    Loop,
    LoopOptions,
    NonFiniteLossError,
    epoch_order,
)
from lvmkit.inference.optim import OptimSpec
from lvmkit.inference.params import param_scope
from lvmkit.inference.rundir import RunDir, history_columns, recorded_threads
from lvmkit.inference.step import prepare
from lvmkit.inference.threads import resumed as resumed_threads, using as using_threads

# compile=None compiles the step only when the run is this long: capture, check and compilation
# take 4-5 s with inductor's cache warm and 12-20 s cold on a 2-core CPU, and a compiled step
# saves 0.7 ms (a tiny network) to 2 ms (the MNIST VAE) of an eager one (docs/architecture.md).
AUTO_COMPILE_STEPS = 2000

__all__ = [
    "AUTO_COMPILE_STEPS",
    "LR_REDUCTION",
    "MAX_LR_REDUCTIONS",
    "NONFINITE_POLICIES",
    "FitResult",
    "NonFiniteLossError",
    "epoch_order",
    "fit",
]


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns.

    ``model`` and ``guide`` are the objects passed in, trained in place and on ``device``;
    ``params`` maps a name to every trained tensor (module parameters under ``model.``/``guide.``,
    ``pyro.param`` sites under their own names); ``history`` has one row per epoch with columns
    ``epoch``, ``train_loss`` (negative ELBO per data point), ``val_elbo`` (when validation data
    were given), ``lr``, ``seconds`` and ``examples_per_s``; ``compiled`` says whether the steps
    ran compiled (False when not asked for, or after a fallback), and ``compile_s`` how long
    capturing, checking and compiling them took (part of the first epoch's ``seconds``).
    """

    model: Callable[..., Any]
    guide: Callable[..., Any]
    history: pd.DataFrame
    params: dict[str, torch.Tensor]
    device: torch.device
    run_dir: Path | None
    compiled: bool = False
    compile_s: float = 0.0
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
    device: str | torch.device | None = None,
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
            each and summing the losses (labelled and unlabelled data, say);
            :class:`lvmkit.Interleaved` steps them as Pyro's semi-supervised examples do, each
            source's minibatch a step of its own.
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
        device: ``None`` (default): train where the data and the pair's parameters already are,
            moving nothing, as Pyro's ``SVI`` does (CPU tensors train on the CPU on a GPU machine
            too; data and parameters on different devices are an error naming them). ``"cpu"``,
            ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when present): move the data and the
            pair's networks there (its modules, the networks it registers with ``pyro.module``,
            its ``pyro.param`` tensors) and run the model, guide and ``transform`` with that
            device as torch's default, so tensors they make without ``device=`` land there too;
            one log line says what moved.
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
        compile: run each step as one compiled function — the loss captured from the pair as
            an FX graph, its gradients, clipping and the optimizer's update compiled together
            by ``torch.compile`` (a CUDA graph on a GPU): :mod:`lvmkit.inference.compiled`.
            Each batch shape's graph is checked on its first minibatch (its loss and gradients
            must equal the eager step's); a pair that cannot be captured (Python decisions on
            tensor values, arguments that are not tensors, BatchNorm's running statistics)
            trains eagerly. ``True``: compile every batch shape, warning when it cannot.
            ``None`` (default): compile when the run has at least :data:`AUTO_COMPILE_STEPS`
            steps (compilation takes seconds; it pays back over a long run), leave an epoch's
            last, smaller minibatch to the eager step, and say in one log line when a pair
            cannot be compiled; a model or guide that declares ``static_structure = False``
            (its structure follows Python state that changes during training: a counter, an
            attribute a callback sets) is never compiled. ``False``: eager steps.
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
    every = None if checkpoint_every is None else check_int("checkpoint_every", checkpoint_every)
    options = LoopOptions(
        validate=validate, checkpoint_every=every, on_nonfinite=on_nonfinite, data_plate=data_plate,
        kl_schedule=kl_schedule, scaler=LatentScale() if kl_schedule is not None else None,
        callbacks=check_callbacks(callbacks),
    )  # fmt: skip
    optim = OptimSpec(
        optimizer, dict(optimizer_args or {}), lr, scheduler, dict(scheduler_args or {}),
        scheduler_interval, clip_norm,
    )  # fmt: skip
    several = distributed.wanted()
    annealed = kl_schedule is not None and not kl_schedule.constant
    compile = _check_compile(compile, several, annealed, validate, model, guide)
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir: the folder holding checkpoint.pt")
    loaded, world = _load_data(
        data, model, guide, several, batch_size=batch_size, transform=transform,
        validation_data=validation_data, device=device, memory_budget=memory_budget,
    )  # fmt: skip
    train, val, dev = loaded.train, loaded.val, loaded.placement.device
    for obj in (model, guide):
        if isinstance(obj, nn.Module):
            obj.train()
    if options.scaler is not None and kl_schedule is not None:  # a constant weight: set once
        options.scaler.weight = kl_schedule.weight(0.0)  # (a warm-up: every step)
    data_bytes = _memory.tensor_bytes([t for f in loaded.all() for t in f.data.tensors()])
    if resume and run_dir is not None:  # the thread count it started with: the same bits
        threads = resumed_threads(threads, recorded_threads(run_dir), f"the run in {run_dir}")

    with (
        using_threads(threads) as threads_used,
        _RunFiles(run_dir, resume, world) as files,
        param_scope(model, guide, publish=True),
    ):
        trainer = prepare(
            model, guide, train, objective=objective, num_particles=num_particles, optim=optim,
            compile=compile, scaler=options.scaler, data_plate=data_plate,
            vectorize_particles=vectorize_particles, memory_budget=memory_budget,
            data_bytes=data_bytes,
        )  # fmt: skip
        if seed is not None:
            pyro.set_rng_seed(seed + world.rank)  # each process its own draws
        order_seed = seed if seed is not None else int(torch.randint(2**31 - 1, ()).item())
        settings = _settings(
            objective, num_particles, batch_size, trainer, order_seed, compile, kl_schedule,
            world, loaded, optim, threads_used,
        )  # fmt: skip
        val_total = 0
        if val is not None and world.distributed:  # each process scores its share
            val_total = val.data.check_sliceable("validation_data")
            share = torch.arange(world.rank, val_total, world.size, device=dev)
            val.data = val.data.take(share)
        if not world.main:
            options = replace(options, callbacks=[])
        loop = Loop(
            trainer, model, guide, options, seed=order_seed, dev=dev, world=world,
            run=files.run, val=val, val_total=val_total, schedule=loaded.schedule,
        )  # fmt: skip
        if trainer.compiled is not None and trainer.compiled.auto:  # worth compiling?
            trainer.compiled.enabled = epochs * loop.steps_per_epoch >= AUTO_COMPILE_STEPS
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
        if world.distributed:  # (not after an error: another rank may never get here)
            trainer.undistribute(world)
    history = pd.DataFrame(loop.progress.history, columns=columns)
    notify(options.callbacks, "on_fit_end", history, None)
    compiled = trainer.compiled is not None and trainer.compiled.ran
    compile_s = trainer.compiled.setup_s if trainer.compiled is not None else 0.0
    return FitResult(
        model, guide, history, dict(trainer.params), dev, files.path, compiled, compile_s,
        stopped_early=loop.stopped,
    )  # fmt: skip


def _load_data(data, model, guide, several: bool, **options: Any) -> tuple[Feeds, Any]:
    """``feeds.load`` for ``fit``, and the process group it joined (several processes)."""
    world = distributed.SINGLE

    def join(dev: torch.device) -> torch.device:  # several processes: this one's device
        nonlocal world
        world, dev = distributed.join(dev)
        return dev

    loaded = load(data, model, guide, join=join if several else None, **options)
    if several and (len(loaded.train) > 1 or loaded.train[0].shares is not None):  # Interleaved
        distributed.leave(world)
        raise ValueError(
            "several data sources (a list of lvmkit.Source) are not supported with several "
            "processes (torchrun) yet; train in one process, or on one source"
        )
    return loaded, world


def _settings(
    objective, num_particles, batch_size, trainer, order_seed, compile, kl_schedule, world,
    loaded: Feeds, optim: OptimSpec, threads_used,
) -> dict[str, Any]:  # fmt: skip
    """What a run records in ``config.json`` and a resume must share."""
    train = loaded.train
    return {
        "objective": objective if isinstance(objective, str) else type(objective).__name__,
        "num_particles": num_particles,
        "batch_size": batch_size,
        "lr": trainer.optim.lr,
        "seed": order_seed,
        "compile": "auto" if compile is None else bool(compile),
        "kl_schedule": kl_schedule.to_dict() if kl_schedule is not None else None,
        "world_size": world.size,
        "num_points": train[0].num_points,
        **optim.describe(),
        **({"sources": [f.name for f in train]} if len(train) > 1 else {}),
        **({"schedule": "interleaved"} if loaded.schedule is not None else {}),
        "threads": threads_used.threads if threads_used is not None else None,
    }


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

    def __init__(self, run_dir: Any, resume: bool, world: distributed.World) -> None:
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
            distributed.agree(self.world, False, "set-up")
            distributed.leave(self.world)
            raise
        return self

    def open(self, loop: Loop, settings: dict[str, Any], metadata, *, keep_seed: bool) -> None:
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
            distributed.agree(self.world, False, "set-up")
            raise
        distributed.agree(self.world, True, "set-up")

    def __exit__(self, *exc: object) -> None:
        if self.run is not None:
            self.run.close()
        distributed.leave(self.world)


def _check_compile(compile, several, annealed, validate, model, guide) -> bool | None:
    """compile=True/False/None (auto) against the other options: True compiles, False does not,
    None compiles a long run (see :func:`fit`)."""
    if compile and several:
        raise ValueError(
            "compile=True is not supported with several processes (torchrun): "
            "DistributedDataParallel wraps the eager loss; use compile=False"
        )
    if compile and annealed:
        raise ValueError(
            "compile=True freezes the KL weight into the compiled graph, but kl_schedule changes "
            "it every step (warmup_epochs > 0): use compile=False, or a constant schedule"
        )
    if compile is None:
        declared = [getattr(obj, "static_structure", None) for obj in (model, guide)]
        if several or annealed or validate or any(d is False for d in declared):
            return False  # (validate: Pyro's checks every step, which a graph cannot run)
    return compile
