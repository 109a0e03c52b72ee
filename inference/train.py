"""The one training loop: SVI on any Pyro model/guide pair.

Data sit on the device; each epoch draws a permutation and takes minibatches by index (no
DataLoader). The loss is an objective's ``nn.Module`` and a torch optimizer drives it. Per-step
losses accumulate on the device and are read once per epoch, so the loop never waits for the
device. Pyro's validation runs on the first step (to catch model errors with Pyro's messages) and
afterwards only when asked. After each epoch the history and a checkpoint are written atomically
to the run directory, if one is given; ``resume=True`` continues from it and ends with the same
parameters as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.infer
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from torch import nn
from tqdm.auto import tqdm

from lvmkit.inference import _distributed, _memory
from lvmkit.inference._data import (
    Batch,
    as_batch,
    check_with_model,
    cuda_devices,
    model_failures_as_data_errors,
    num_points,
    resolve_device,
    take,
    to_device,
)
from lvmkit.inference._params import collect_params, param_scope
from lvmkit.inference._rundir import RunDir, history_columns, rng_state, set_rng_state
from lvmkit.inference.annealing import KLSchedule, LatentScale
from lvmkit.inference.callbacks import FitInfo, check_callbacks, notify
from lvmkit.inference.compiled import CompiledLoss
from lvmkit.inference.evaluate import mean_elbo
from lvmkit.inference.objectives import make_objective
from lvmkit.models._checks import check_choice, check_float, check_int

NONFINITE_POLICIES = ("raise", "reduce_lr")
LR_REDUCTION = 0.5  # on_nonfinite="reduce_lr": the factor applied to lr after each rollback
MAX_LR_REDUCTIONS = 5  # ... and how many times before giving up with NonFiniteLossError


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns.

    ``model`` and ``guide`` are the objects passed in, trained in place and on ``device``;
    ``params`` maps a name to every trained tensor (module parameters under ``model.``/``guide.``,
    ``pyro.param`` sites under their own names); ``history`` has one row per epoch with columns
    ``epoch``, ``train_loss`` (negative ELBO per data point), ``val_elbo`` (when validation data
    were given), ``seconds`` and ``examples_per_s``; ``compiled`` says whether the steps ran
    through the traced loss (False when not asked for, or after a fallback).
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
    batch_size: int = 128,
    lr: float = 1e-3,
    objective: str | pyro.infer.ELBO = "elbo",
    num_particles: int = 1,
    seed: int = 0,
    device: str | torch.device = "auto",
    validation_data: Any = None,
    transform: Callable[[Any], Any] | None = None,
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
) -> FitResult:
    """Train ``model``/``guide`` by stochastic variational inference with Adam.

    Args:
        model, guide: a Pyro model and guide with the same signature; PyroModules (parameters in
            the module) or plain functions that register networks with ``pyro.module``.
        data: a tensor passed as ``x``, or a dict of equal-length tensors passed as keywords.
        epochs: total epochs; with ``resume=True`` training continues up to this number.
        batch_size, lr: minibatch size and Adam's learning rate.
        objective: ``"elbo"`` (Trace_ELBO), ``"mean_field"`` (analytic KL), ``"iwae"`` (the
            importance-weighted bound), ``"rws"`` (reweighted wake-sleep), or a Pyro ELBO
            (e.g. ``TraceEnum_ELBO`` for discrete latents the guide enumerates).
        num_particles: samples of z per data point in the objective (vectorised); the K of
            ``"iwae"`` and ``"rws"``.
        seed: seeds Pyro, torch, numpy and ``random`` before training; with the same seed, the
            same initial modules and the same device, the same numbers come out. (Modules are
            initialised when you build them: seed that too, e.g. ``pyro.set_rng_seed``.)
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``. Modules and data are moved.
        validation_data: like ``data``; its one-sample ELBO per point is logged each epoch.
        transform: applied to each minibatch on the device before the model sees it, e.g.
            :func:`lvmkit.data.binarize` for dynamic binarization; gets and returns what ``data``
            is (a tensor or a dict).
        run_dir: folder for ``config.json``, ``history.csv`` and ``checkpoint.pt`` (written
            after every epoch, checksummed, the one before kept as ``checkpoint.prev.pt``); locked
            against a second process while ``fit`` runs.
        resume: continue the run in ``run_dir`` from its checkpoint (mid-epoch ones included).
        metadata: JSON-serialisable facts stored in ``config.json`` (e.g. the model config).
        validate: keep Pyro's validation on after the first step (slower).
        compile: trace the ``"elbo"`` loss with the PyTorch JIT, once per batch shape
            (:mod:`lvmkit.inference.compiled`); for models whose structure is the same every
            step. A model that cannot be traced trains uncompiled, with a warning saying why.
            ``None`` (default): compile when the objective is ``"elbo"`` with one particle and
            no KL warm-up, and model and guide declare ``static_structure = True`` (the
            built-in VAE and encoder do); user
            models stay uncompiled unless asked, since tracing would freeze data-dependent
            control flow without a word.
        checkpoint_every: also check and checkpoint every this many steps inside an epoch
            (``None``: at epoch ends only). Each check point costs one host sync.
        on_nonfinite: what to do when the loss, a gradient or a parameter turns NaN/inf — found
            at the next check point, without a per-step sync. Either way the loop first rolls
            back to the last good check point and replays the steps since, to find the epoch,
            step and sample site where it appeared. ``"raise"``: raise
            :class:`NonFiniteLossError` naming them. ``"reduce_lr"``: multiply lr by
            :data:`LR_REDUCTION`, warn, and continue (at most :data:`MAX_LR_REDUCTIONS` times).
        memory_budget: bytes (or a size such as ``"4GiB"``) one training step may use, data
            included; ``None``: 90 % of the memory free on the device. The first step's
            activations are measured; a step that would not fit is refused before training
            starts, with the ``batch_size`` that would fit.
        kl_schedule: a :class:`lvmkit.KLSchedule` weighting the latent sites (β-VAE, KL
            warm-up); the weight is logged per epoch as ``kl_weight`` and ``train_loss`` is the
            weighted objective, while ``val_elbo`` stays the unweighted ELBO.
        progress: show a tqdm progress bar.

    A model or guide with an ``adversary`` attribute (an ``nn.Module``, e.g. the AAE's
    discriminator) gets a second Adam for that module's parameters, with learning rate
    ``adversary_lr`` if it defines one; the objective's gradient must reach those parameters only
    through the adversary's own loss (see :mod:`lvmkit.models.autoencoder`). Modules are put in
    training mode for the steps and in eval mode for validation and evaluation.

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
    batch_size = check_int("batch_size", batch_size)
    lr = check_float("lr", lr)
    seed = check_int("seed", seed, minimum=0)
    for flag, value in (("resume", resume), ("validate", validate), ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False; got {value!r}")
    if run_dir is not None and not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"run_dir must be a str or os.PathLike; got {type(run_dir).__name__}")
    if metadata is not None:
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as err:
            raise TypeError(f"metadata must be a JSON-serialisable dict: {err}") from err
    _check_callable("model", model)
    _check_callable("guide", guide)
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable or None; got {type(transform).__name__}")
    if checkpoint_every is not None:
        checkpoint_every = check_int("checkpoint_every", checkpoint_every)
    check_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
    if kl_schedule is not None and not isinstance(kl_schedule, KLSchedule):
        raise TypeError(
            f"kl_schedule must be a lvmkit.KLSchedule or None; got {type(kl_schedule).__name__}"
        )
    annealed = kl_schedule is not None and not kl_schedule.constant
    _memory.parse_budget(memory_budget)
    callbacks = check_callbacks(callbacks)
    if compile is not None and not isinstance(compile, bool):
        raise TypeError(f"compile must be True, False or None (auto); got {compile!r}")
    distributed = _distributed.launched() or (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )
    if compile and distributed:
        raise ValueError(
            "compile=True is not supported with several processes (torchrun): "
            "DistributedDataParallel wraps the eager loss; use compile=False"
        )
    if compile is None:
        compile = (
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
    dev = resolve_device(device)
    world = _distributed.SINGLE
    if distributed:
        world, dev = _distributed.join(dev)
    elbo = make_objective(objective, num_particles=num_particles)
    settings = {
        "objective": objective if isinstance(objective, str) else type(objective).__name__,
        "num_particles": num_particles,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "compile": bool(compile),
        "kl_schedule": kl_schedule.to_dict() if kl_schedule is not None else None,
        "world_size": world.size,
    }
    tensor_data = isinstance(data, (torch.Tensor, np.ndarray))
    train = as_batch(data, name="data")
    val = as_batch(validation_data, name="validation_data") if validation_data is not None else None
    settings["num_points"] = num_points(train)
    check_with_model(model, train)
    if val is not None:
        check_with_model(model, val)
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir: the folder holding checkpoint.pt")

    data_bytes = _memory.tensor_bytes([*train.values(), *(val or {}).values()])
    if dev.type != "cpu":  # on the CPU the data are in memory already
        _check_data_memory(data_bytes, memory_budget, dev)
    for obj in (model, guide):
        if isinstance(obj, nn.Module):
            obj.to(dev)
            obj.train()
    train, val = to_device(train, dev), (to_device(val, dev) if val is not None else None)
    pyro.set_rng_seed(seed + world.rank)  # each process its own draws; rank 0 as one process
    scaler = LatentScale() if kl_schedule is not None else None

    def set_kl_weight(epochs_done: float) -> float:
        assert kl_schedule is not None and scaler is not None
        scaler.weight = kl_schedule.weight(epochs_done)
        return scaler.weight

    # what the loss sees: the pair, or the pair with its latent sites weighted (one messenger,
    # entered by the guide and then by the model, never both at once)
    scored = (scaler(model), scaler(guide)) if scaler is not None else (model, guide)
    if scaler is not None:  # a constant weight is set once here, a warm-up every step
        set_kl_weight(0.0)
    loss_fn = elbo(*scored)
    # what a step calls: the loss module, wrapped in DDP once the parameters exist. Under DDP
    # each process's loss is multiplied by the number of processes, so that the averaged
    # gradient is the gradient of the loss summed over every process's minibatch — the same as
    # one process with the whole effective batch.
    active: dict[str, Any] = {"loss": loss_fn, "factor": 1}

    def prepare(batch: Batch) -> Batch:
        if transform is None:
            return batch
        out = transform(batch["x"] if tensor_data else batch)
        return {"x": out} if tensor_data else out

    def eager_loss(batch: Batch) -> torch.Tensor:
        loss = active["loss"](**prepare(batch))
        return loss * active["factor"] if active["factor"] != 1 else loss

    traced = CompiledLoss(*scored, list(train), lambda b: loss_fn(**b)) if compile else None

    def step_loss(batch: Batch) -> torch.Tensor:
        return eager_loss(batch) if traced is None else traced(prepare(batch))

    run: RunDir | None = None
    reader: RunDir | None = None  # ranks other than 0 only read the checkpoint
    try:
        try:
            if run_dir is not None and world.main:
                run = RunDir(run_dir, resume=resume)
            elif run_dir is not None and resume:
                reader = RunDir(run_dir, resume=True, read_only=True)
        except BaseException:
            _distributed.agree(world, False, "set-up")
            raise
        with param_scope(model, guide, publish=True):
            first = take(train, slice(0, batch_size))
            params, activations = _first_step(
                eager_loss, first, model, guide, dev, transform is not None
            )
            _check_step_memory(
                activations,
                params.values(),
                data_bytes if memory_budget is not None else 0,
                memory_budget,
                dev,
                batch_size=min(batch_size, num_points(train)),
                num_particles=num_particles,
            )
            loss_scale = _data_plate_scale(model, lambda: prepare(first))
            optimizer = _optimizers(params, model, guide, lr=lr)
            val_points = num_points(val) if val is not None else 0
            if val is not None and world.distributed:  # each process scores its share
                val = take(val, torch.arange(world.rank, val_points, world.size, device=dev))
            loop = _Loop(
                params=params,
                optimizer=optimizer,
                dev=dev,
                run=run,
                lr=lr,
                train=train,
                batch_size=batch_size,
                seed=seed,
                validate=validate,
                checkpoint_every=checkpoint_every,
                on_nonfinite=on_nonfinite,
                step_loss=step_loss,
                diagnose=lambda batch: _first_nonfinite_site(elbo, model, guide, prepare(batch)),
                val_elbo=(
                    (lambda: _val_elbo(world, model, guide, val, val_points))
                    if val is not None
                    else None
                ),
                loss_scale=loss_scale,
                on_step=set_kl_weight if kl_schedule is not None else None,
                callbacks=callbacks if world.main else [],
                world=world,
            )
            shapes = {k: tuple(v.shape) for k, v in params.items()}
            try:
                if run is not None and resume:
                    loop.restore(run.load(settings, shapes))
                elif reader is not None:
                    loop.restore(reader.load(settings, shapes))
                elif run is not None:
                    run.start(settings, metadata)
            except BaseException:
                _distributed.agree(world, False, "set-up")
                raise
            _distributed.agree(world, True, "set-up")
            if world.distributed:
                active["loss"], average = _distributed.wrap_loss(world, loss_fn, params, dev)
                active["factor"] = world.size
                if average:
                    loop.optimizer = _GradAveraging(world, optimizer, params.values())
            columns = history_columns(val is not None, kl_schedule is not None)
            info = FitInfo(
                settings,
                dict(metadata or {}),
                epochs,
                run.path if run else None,
                loop.rows,
                world.size,
            )
            notify(loop.callbacks, "on_fit_start", info)
            try:
                loop.run(epochs, progress=progress and world.main)
            except BaseException as err:
                history = pd.DataFrame(loop.rows, columns=columns)
                notify(loop.callbacks, "on_fit_end", history, err)
                raise
    finally:
        if run is not None:
            run.close()
        _distributed.leave(world)
    history = pd.DataFrame(loop.rows, columns=columns)
    notify(loop.callbacks, "on_fit_end", history, None)
    compiled = traced is not None and traced.failure is None
    return FitResult(
        model,
        guide,
        history,
        dict(params),
        dev,
        run.path if run else None,
        compiled,
        stopped_early=loop.stopped,
    )


class NonFiniteLossError(FloatingPointError, ValueError):
    """The loss, a gradient or a parameter became NaN or infinite during ``fit``.

    Raised after the parameters, optimizer and random state were rolled back to the last good
    checkpoint; ``epoch``, ``step`` and ``site`` say where the first non-finite value appeared
    (``site`` is ``None`` when the replay could not pin it to a sample site). A ``ValueError`` as
    well, since what causes it is a value: the data, the learning rate, or the model's numerics.
    """

    def __init__(self, message: str, *, epoch: int, step: int | None, site: str | None) -> None:
        super().__init__(message)
        self.epoch, self.step, self.site = epoch, step, site


class _Loop:
    """The epoch/step loop with its checkpoints, non-finite checks and rollback.

    The loop's whole state — parameters, optimizer, random state, the epoch and step reached,
    that epoch's data order, its running loss and elapsed time, the history and the learning rate
    — is taken as a *snapshot* at every check point (each epoch end, and every
    ``checkpoint_every`` steps). A snapshot is what a checkpoint holds; a non-finite value found
    at a check point sends the loop back to the previous snapshot.
    """

    def __init__(
        self,
        *,
        params,
        optimizer,
        dev,
        run,
        lr,
        train,
        batch_size,
        seed,
        validate,
        checkpoint_every,
        on_nonfinite,
        step_loss,
        diagnose,
        val_elbo,
        loss_scale=1.0,
        on_step=None,
        callbacks=(),
        world=_distributed.SINGLE,
    ) -> None:
        self.params: dict[str, torch.Tensor] = params
        self.optimizer: Any = optimizer  # Adam, or _TwoOptimizers / _GradAveraging around it
        self.dev, self.rundir, self.lr = dev, run, lr
        self.train, self.batch_size, self.seed = train, batch_size, seed
        self.validate, self.checkpoint_every, self.on_nonfinite = (
            validate,
            checkpoint_every,
            on_nonfinite,
        )
        self.step_loss, self.diagnose, self.val_elbo = step_loss, diagnose, val_elbo
        self.loss_scale = loss_scale  # a subsampling data plate's N / n: undone in train_loss
        self.on_step = on_step  # sets the KL weight for the coming step; returns it
        self.kl_weight: float | None = None
        self.callbacks = list(callbacks)
        self.stopped = False  # a callback asked to stop
        self.world: _distributed.World = world
        self.total = num_points(train)  # over all processes
        self.shard = _distributed.shard_size(world, self.total)  # this process's points an epoch
        self.steps_per_epoch = -(-self.shard // batch_size)
        self.epoch = 0  # epochs completed
        self.step = 0  # steps completed in epoch ``self.epoch + 1``
        self.order: torch.Tensor | None = None  # that epoch's data order, once drawn
        self.running = torch.zeros((), device=dev)
        self.running_value = 0.0  # ``running`` as last read on the host
        self.elapsed = 0.0
        self.rows: list[dict[str, float]] = []
        self.lr_reductions = 0
        self.good: dict[str, Any] = {}

    # -- state --------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        order = self.order.cpu() if self.order is not None and self.step else None
        return {
            "epoch": self.epoch,
            "step": self.step,
            "order": order,
            "running": self.running_value,
            "elapsed": self.elapsed,
            "lr": self.lr,
            "lr_reductions": self.lr_reductions,
            "params": {k: v.detach().cpu().clone() for k, v in self.params.items()},
            "optimizer": copy.deepcopy(_cpu(self.optimizer.state_dict())),
            "rng": rng_state(self.dev),
            "history": [dict(row) for row in self.rows],
            **({"ranks": self._rank_states(order)} if self.world.distributed else {}),
        }

    def _rank_states(self, order: torch.Tensor | None) -> list[dict[str, Any]]:
        """What differs between the processes, each one's: its random state, its shard's order
        and its share of the running loss (``running`` above is the sum over them)."""
        own = {"rng": rng_state(self.dev), "order": order, "running": float(self.running)}
        return _distributed.gather(self.world, own)

    def restore(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, value in state["params"].items():
                self.params[name].copy_(value)
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        own = state["ranks"][self.world.rank] if "ranks" in state else state  # distributed: its own
        order = own.get("order")
        self.order = order.to(self.dev) if order is not None else None
        self.running_value = float(state["running"])
        self.running = torch.tensor(float(own["running"]), device=self.dev)
        self.elapsed = float(state["elapsed"])
        self.lr, self.lr_reductions = float(state["lr"]), int(state["lr_reductions"])
        self.rows = [dict(row) for row in state["history"]]
        set_rng_state(own["rng"], self.dev)
        self.good = state

    def _set_lr(self, lr: float) -> None:
        factor, self.lr = lr / self.lr, lr
        for group in self.optimizer.param_groups:  # an adversary's own lr keeps its ratio
            group["lr"] = group["lr"] * factor

    # -- the loop -----------------------------------------------------------------------------

    def run(self, epochs: int, *, progress: bool) -> None:
        if not self.good:
            self.good = self.snapshot()  # where a non-finite first check point rolls back to
        bar = tqdm(
            total=max(0, (epochs - self.epoch) * self.steps_per_epoch - self.step),
            disable=not progress,
            unit="step",
            desc="fit",
            dynamic_ncols=True,
        )
        first_step = True
        while self.epoch < epochs and not self.stopped:
            if self.order is None:
                self.order = self._epoch_order()
            tic = time.perf_counter()
            rolled_back = False
            while self.step < self.steps_per_epoch:
                self._before_step()
                with pyro.validation_enabled(self.validate or first_step):
                    self.running += train_step(self.step_loss, self.optimizer, self._batch())
                first_step = False
                self.step += 1
                bar.update(1)
                end = self.step == self.steps_per_epoch
                if end or (self.checkpoint_every and self.step % self.checkpoint_every == 0):
                    self.elapsed += time.perf_counter() - tic
                    if not self._finite():
                        self._recover()
                        rolled_back = True
                        break
                    if end:
                        self._end_epoch(bar)
                    self.good = self.snapshot()
                    if self.rundir is not None:
                        self.rundir.save(self.good)
                        notify(
                            self.callbacks,
                            "on_checkpoint",
                            self.rundir.checkpoint,
                            self.epoch,
                            self.step,
                        )
                    if end:
                        replies = notify(
                            self.callbacks, "on_epoch_end", self.epoch, dict(self.rows[-1])
                        )
                        stop = any(reply is True for reply in replies)  # (rank 0's callbacks)
                        self.stopped = _distributed.any_rank(self.world, stop)
                        break
                    tic = time.perf_counter()
            if rolled_back:
                bar.reset(total=(epochs - self.epoch) * self.steps_per_epoch - self.step)
        bar.close()

    def _epoch_order(self) -> torch.Tensor:
        epoch = self.epoch + 1
        if self.world.distributed:
            return _distributed.epoch_order(self.world, self.seed, epoch, self.total).to(self.dev)
        return _epoch_permutation(self.seed, epoch, self.total).to(self.dev)

    def _before_step(self) -> None:
        if self.on_step is not None:
            self.kl_weight = self.on_step(self.epoch + self.step / self.steps_per_epoch)

    def _batch(self) -> Batch:
        assert self.order is not None
        index = self.order[self.step * self.batch_size : (self.step + 1) * self.batch_size]
        return take(self.train, index)

    def _finite(self) -> bool:
        """One host sync: read the running loss, and check it and every parameter are finite."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.params.values()]).all()
        bad = (~finite).to(self.running.dtype)
        summed = _distributed.all_sum(self.world, torch.stack([self.running, bad]))
        running, bad_ranks = summed.tolist()  # the one host sync
        self.running_value = running  # summed over the processes
        return not bad_ranks and math.isfinite(running)

    def _end_epoch(self, bar) -> None:
        # step losses are summed over the processes, each multiplied by their number (so that
        # DDP's averaged gradient is the whole effective batch's): undo both
        points = self.shard * self.world.size
        per_point = self.running_value / (points * self.world.size * self.loss_scale)
        row = {"epoch": self.epoch + 1, "train_loss": per_point}
        if self.kl_weight is not None:
            row["kl_weight"] = self.kl_weight  # at the epoch's last step
        if self.val_elbo is not None:
            row["val_elbo"] = self.val_elbo()
        row.update(lr=self.lr, seconds=self.elapsed, examples_per_s=self.total / self.elapsed)
        self.rows.append(row)
        bar.set_postfix({k: f"{v:.2f}" for k, v in row.items() if k in ("train_loss", "val_elbo")})
        self.epoch, self.step, self.order = self.epoch + 1, 0, None
        self.running = torch.zeros((), device=self.dev)
        self.running_value = 0.0
        self.elapsed = 0.0

    # -- non-finite values ----------------------------------------------------------------------

    def _recover(self) -> None:
        """Roll back to the last good snapshot; find the step and site; raise or lower the lr."""
        bad_epoch = self.epoch + 1
        self.restore(self.good)
        if self.world.distributed:  # a replay step by step would need every process in step
            where, epoch, step, site = (
                f"the loss or parameters became non-finite in epoch {bad_epoch} (not located to a "
                f"step: training runs in {self.world.size} processes)",
                bad_epoch,
                None,
                None,
            )
        else:
            where, epoch, step, site = self._locate(bad_epoch)
            self.restore(self.good)
        rolled = (
            "the start of training"
            if not self.rows and not self.step and not self.epoch
            else f"the checkpoint in epoch {self.epoch + 1}, after step {self.step}"
            if self.step
            else f"the checkpoint after epoch {self.epoch}"
        )
        if self.on_nonfinite == "reduce_lr" and self.lr_reductions < MAX_LR_REDUCTIONS:
            warnings.warn(
                f"{where}; rolled back to {rolled} and continuing with "
                f"lr {self.lr:g} → {self.lr * LR_REDUCTION:g} (reduction "
                f"{self.lr_reductions + 1} of at most {MAX_LR_REDUCTIONS})",
                RuntimeWarning,
                stacklevel=4,
            )
            self._set_lr(self.lr * LR_REDUCTION)
            self.lr_reductions += 1
            self.good = self.snapshot()
            if self.rundir is not None:
                self.rundir.save(self.good)
            return
        advice = (
            f"on_nonfinite='reduce_lr' already lowered the lr {MAX_LR_REDUCTIONS} times"
            if self.on_nonfinite == "reduce_lr"
            else "Lower lr, or pass on_nonfinite='reduce_lr' to lower it automatically"
        )
        saved = f" ({self.rundir.checkpoint} holds it)" if self.rundir is not None else ""
        raise NonFiniteLossError(
            f"{where}. The model, guide and optimizer were rolled back to {rolled}{saved}. "
            f"{advice} (now {self.lr:g}), or check the model "
            "for log(0), division by zero or overflow.",
            epoch=epoch,
            step=step,
            site=site,
        )

    def _locate(self, bad_epoch: int) -> tuple[str, int, int | None, str | None]:
        """Replay the steps from the last snapshot to the end of ``bad_epoch`` one at a time,
        checking each on the host; return a description and the epoch, step and sample site of
        the first non-finite value (step and site None where the replay cannot tell)."""
        while self.epoch < bad_epoch:
            if self.order is None:
                self.order = self._epoch_order()
            before = rng_state(self.dev)
            self._before_step()
            batch = self._batch()
            epoch, step = self.epoch + 1, self.step + 1
            at = f"epoch {epoch}, step {step} of {self.steps_per_epoch}"
            with pyro.validation_enabled(False):
                loss = self.step_loss(batch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            problem = None
            if not bool(torch.isfinite(loss.detach())):
                problem = f"the loss became {loss.detach().item():g}"
            else:
                for name, p in self.params.items():
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                        problem = f"the gradient of parameter {name!r} became non-finite"
                        break
            if problem is None:
                self.optimizer.step()
                for name, p in self.params.items():
                    if not bool(torch.isfinite(p).all()):
                        problem = f"the optimizer step made parameter {name!r} non-finite"
                        break
            if problem is not None:
                # draw this step's samples again; the caller restores the whole state after
                set_rng_state(before, self.dev)
                with torch.no_grad(), pyro.validation_enabled(False):
                    site = self.diagnose(batch)
                found = f", first at sample site {site[0]!r} ({site[1]})" if site else ""
                message = f"non-finite values in {at}: {problem}{found}"
                return message, epoch, step, site[0] if site else None
            self.step += 1
            if self.step == self.steps_per_epoch:
                self.epoch, self.step, self.order = self.epoch + 1, 0, None
        message = (
            f"the loss or parameters became non-finite by the end of epoch {bad_epoch}, but "
            "replaying the steps one by one did not reproduce it (non-deterministic kernels?)"
        )
        return message, bad_epoch, None, None


def _val_elbo(world: _distributed.World, model, guide, val: Batch, total: int) -> float:
    """The one-sample validation ELBO per point; each process scores its share."""
    local = mean_elbo(model, guide, val) * num_points(val)
    return float(_distributed.all_sum(world, local)) / total


class _GradAveraging:
    """An optimizer that first averages the gradients over the processes (for pairs whose
    parameters DDP cannot see: see :mod:`lvmkit.inference._distributed`)."""

    def __init__(self, world: _distributed.World, optimizer, params: Iterable[torch.Tensor]):
        self.world, self.optimizer, self.params = world, optimizer, list(params)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        _distributed.average_grads(self.world, self.params)
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


def _first_nonfinite_site(elbo, model, guide, batch: Batch) -> tuple[str, str] | None:
    """The first sample site (guide first, then model) with a non-finite value or log-density,
    drawn exactly as the objective draws them under the current random state."""
    try:
        model_trace, guide_trace = next(iter(elbo._get_traces(model, guide, (), batch)))
    except Exception as err:  # a model that fails outright on non-finite parameters
        return ("?", f"the model/guide raised {type(err).__name__}: {err}")
    for role, trace in (("guide", guide_trace), ("model", model_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            value = site["value"]
            if torch.is_tensor(value) and not bool(torch.isfinite(value).all()):
                return name, f"{role}: its value is non-finite"
            log_prob = site["fn"].log_prob(value)
            if not bool(torch.isfinite(log_prob).all()):
                bad = log_prob[~torch.isfinite(log_prob)].flatten()[0].item()
                return name, f"{role}: its log-density is {bad}"
    return None


def _cpu(obj: Any) -> Any:
    """A nested structure with every tensor moved to the CPU (checkpoints load on any device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj


class _TwoOptimizers:
    """The pair's Adam and the adversary's, stepped together after one backward pass (the
    objective routes each parameter's gradient from its own loss); one state dict for both."""

    def __init__(self, main: torch.optim.Optimizer, adversary: torch.optim.Optimizer) -> None:
        self.optimizers = (main, adversary)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "main": self.optimizers[0].state_dict(),
            "adversary": self.optimizers[1].state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"main", "adversary"}:
            raise ValueError("the checkpoint's optimizer state has no adversary optimizer")
        self.optimizers[0].load_state_dict(state["main"])
        self.optimizers[1].load_state_dict(state["adversary"])


def _optimizers(params: dict[str, torch.Tensor], model, guide, *, lr: float):
    """Adam over the parameters; a second Adam for an ``adversary`` module's, if there is one."""
    owners = [
        obj for obj in (model, guide) if isinstance(getattr(obj, "adversary", None), nn.Module)
    ]
    if not owners:
        return make_optimizer(params.values(), lr=lr)
    if len(owners) > 1:
        raise ValueError("only one of model and guide may define an adversary")
    owner = owners[0]
    adversary_ids = {id(p) for p in owner.adversary.parameters()}
    adversary = [p for p in params.values() if id(p) in adversary_ids]
    main = [p for p in params.values() if id(p) not in adversary_ids]
    if not adversary or not main:
        raise ValueError("the adversary must own some, but not all, of the trainable parameters")
    adversary_lr = check_float("adversary_lr", getattr(owner, "adversary_lr", lr))
    return _TwoOptimizers(make_optimizer(main, lr=lr), make_optimizer(adversary, lr=adversary_lr))


def make_optimizer(params: Iterable[torch.Tensor], *, lr: float) -> torch.optim.Adam:
    """Adam, fused into one kernel per step where torch has that kernel for every parameter."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel: the foreach version
        return torch.optim.Adam(params, lr=lr)


def train_step(
    step_loss: Callable[[Batch], torch.Tensor], optimizer: torch.optim.Optimizer, batch: Batch
) -> torch.Tensor:
    """One SVI step; returns the loss as a device tensor (no host sync)."""
    loss = step_loss(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _check_data_memory(data_bytes: int, memory_budget: Any, dev: torch.device) -> None:
    budget, what = _memory.budget_for(memory_budget, dev)
    if budget is not None and data_bytes > budget:
        raise ValueError(
            f"the data need {_memory.fmt(data_bytes)} on {dev}, more than {what} "
            f"({_memory.fmt(budget)}); train on a subset, or on a device with more memory"
        )


def _check_step_memory(
    activations: int,
    params: Iterable[torch.Tensor],
    data_bytes: int,
    memory_budget: Any,
    dev: torch.device,
    *,
    batch_size: int,
    num_particles: int,
) -> None:
    """Refuse a step that cannot fit: activations (measured) + parameters, gradients and Adam's
    two moments + the data when the budget is the caller's total."""
    budget, what = _memory.budget_for(memory_budget, dev)
    fixed = 4 * _memory.tensor_bytes(params) + data_bytes
    if budget is None or activations + fixed <= budget:
        return
    # activations grow about linearly with the batch; 10 % margin for what does not scale
    fits = int(0.9 * batch_size * (budget - fixed) / max(activations, 1))
    advice = (
        f"Use batch_size <= {fits} or fewer num_particles"
        if fits >= 1
        else "The parameters and data alone take more than that: use a smaller model or data set"
    )
    raise ValueError(
        f"one training step needs about {_memory.fmt(activations + fixed)} on {dev}: "
        f"{_memory.fmt(activations)} of activations for a minibatch of {batch_size} × "
        f"{num_particles} particle(s) (measured on the first step), "
        f"{_memory.fmt(fixed - data_bytes)} for parameters, gradients and Adam's state"
        + (f", {_memory.fmt(data_bytes)} of data" if data_bytes else "")
        + f" — more than {what} ({_memory.fmt(budget)}). {advice}, or give a larger "
        "memory_budget (nothing was trained)."
    )


def _data_plate_scale(model, first_batch: Callable[[], Batch]) -> float:
    """The factor by which the model scales a minibatch's observed sites (N / n when its data
    plate subsamples, as in ``pyro.plate("data", N, subsample=...)``; else 1), read from one
    trace of the model on the first minibatch, drawn under a forked random state."""
    try:
        with (
            torch.no_grad(),
            torch.random.fork_rng(devices=cuda_devices()),
            pyro.validation_enabled(False),
            poutine.block(),
        ):
            trace = poutine.trace(model).get_trace(**first_batch())
    except Exception:  # a model that needs its guide's draws to run: assume no scaling
        return 1.0
    scales = [
        float(site["scale"])
        for site in trace.nodes.values()
        if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site)
    ]
    return max(scales, default=1.0)


def _first_step(eager_loss, first: Batch, model, guide, dev, transformed: bool):
    """Run the set-up step that finds the parameters (a failure there reported as a data/model
    mismatch); return them and the bytes of activations the step saved for backward."""
    where = "the first minibatch of data" + (" (after transform)" if transformed else "")
    with model_failures_as_data_errors(where, first):
        params, saved = _memory.measure_saved(
            lambda: collect_params(eager_loss, first, model, guide, dev)
        )
    return params, _memory.activation_bytes(saved, params.values())


def _check_callable(name: str, obj: Any) -> None:
    if not callable(obj):
        raise TypeError(f"{name} must be a Pyro {name} (a callable); got {type(obj).__name__}")


def _epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The data order of one epoch: a function of (seed, epoch) only, so resume replays it."""
    state = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return torch.randperm(n, generator=torch.Generator().manual_seed(state))
