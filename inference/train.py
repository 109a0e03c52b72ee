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

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.infer
import torch
from torch import nn
from tqdm.auto import tqdm

from lvmkit.inference._data import (
    Batch,
    as_batch,
    check_with_model,
    num_points,
    resolve_device,
    take,
    to_device,
)
from lvmkit.inference._params import collect_params, param_scope
from lvmkit.inference._rundir import (
    RunDir,
    history_columns,
)
from lvmkit.inference.compiled import CompiledLoss
from lvmkit.inference.evaluate import mean_elbo
from lvmkit.inference.objectives import make_objective
from lvmkit.models._checks import check_float, check_int


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
    progress: bool = True,
) -> FitResult:
    """Train ``model``/``guide`` by stochastic variational inference with Adam.

    Args:
        model, guide: a Pyro model and guide with the same signature; PyroModules (parameters in
            the module) or plain functions that register networks with ``pyro.module``.
        data: a tensor passed as ``x``, or a dict of equal-length tensors passed as keywords.
        epochs: total epochs; with ``resume=True`` training continues up to this number.
        batch_size, lr: minibatch size and Adam's learning rate.
        objective: ``"elbo"`` (Trace_ELBO), ``"mean_field"`` (analytic KL) or a Pyro ELBO.
        num_particles: samples of z per data point in the objective (vectorised).
        seed: seeds Pyro, torch, numpy and ``random`` before training; with the same seed, the
            same initial modules and the same device, the same numbers come out. (Modules are
            initialised when you build them: seed that too, e.g. ``pyro.set_rng_seed``.)
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``. Modules and data are moved.
        validation_data: like ``data``; its one-sample ELBO per point is logged each epoch.
        transform: applied to each minibatch on the device before the model sees it, e.g.
            :func:`lvmkit.data.binarize` for dynamic binarization; gets and returns what ``data``
            is (a tensor or a dict).
        run_dir: folder for ``config.json``, ``history.csv`` and ``checkpoint.pt`` (every epoch).
        resume: continue the run in ``run_dir`` from its checkpoint.
        metadata: JSON-serialisable facts stored in ``config.json`` (e.g. the model config).
        validate: keep Pyro's validation on after the first step (slower).
        compile: trace the ``"elbo"`` loss with the PyTorch JIT, once per batch shape
            (:mod:`lvmkit.inference.compiled`); for models whose structure is the same every
            step. A model that cannot be traced trains uncompiled, with a warning saying why.
            ``None`` (default): compile when the objective is ``"elbo"`` and both model and
            guide declare ``static_structure = True`` (the built-in VAE and encoder do); user
            models stay uncompiled unless asked, since tracing would freeze data-dependent
            control flow without a word.
        progress: show a tqdm progress bar.

    Example::

        >>> import torch, lvmkit
        >>> config = lvmkit.VAEConfig(data_dim=4, latent_dim=2, hidden_dims=(8,))
        >>> model, guide = lvmkit.build_vae(config)
        >>> x = torch.bernoulli(torch.full((64, 4), 0.3))
        >>> result = lvmkit.fit(model, guide, x, epochs=2, device="cpu", progress=False)
        >>> list(result.history.epoch)
        [1, 2]
    """
    check_int("epochs", epochs)
    check_int("batch_size", batch_size)
    check_float("lr", lr)
    check_int("seed", seed, minimum=0)
    _check_callable("model", model)
    _check_callable("guide", guide)
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable or None; got {type(transform).__name__}")
    if compile is not None and not isinstance(compile, bool):
        raise TypeError(f"compile must be True, False or None (auto); got {compile!r}")
    if compile is None:
        compile = objective == "elbo" and all(
            getattr(obj, "static_structure", False) is True for obj in (model, guide)
        )
    if compile and objective != "elbo":
        raise ValueError(
            f"compile=True traces the 'elbo' objective only; got objective={objective!r} "
            "(use objective='elbo', or compile=False)"
        )
    dev = resolve_device(device)
    elbo = make_objective(objective, num_particles=num_particles)
    settings = {
        "objective": objective if isinstance(objective, str) else type(objective).__name__,
        "num_particles": num_particles,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "compile": bool(compile),
    }
    tensor_data = isinstance(data, (torch.Tensor, np.ndarray))
    train = as_batch(data, name="data")
    val = as_batch(validation_data, name="validation_data") if validation_data is not None else None
    total = settings["num_points"] = num_points(train)
    check_with_model(model, train)
    if val is not None:
        check_with_model(model, val)
    run = RunDir(run_dir, resume=resume) if run_dir is not None else None
    if resume and run is None:
        raise ValueError("resume=True needs run_dir: the folder holding checkpoint.pt")

    for obj in (model, guide):
        if isinstance(obj, nn.Module):
            obj.to(dev)
    train, val = to_device(train, dev), (to_device(val, dev) if val is not None else None)
    pyro.set_rng_seed(seed)
    loss_fn = elbo(model, guide)

    def prepare(batch: Batch) -> Batch:
        if transform is None:
            return batch
        out = transform(batch["x"] if tensor_data else batch)
        return {"x": out} if tensor_data else out

    def eager_loss(batch: Batch) -> torch.Tensor:
        return loss_fn(**prepare(batch))

    traced = CompiledLoss(model, guide, list(train), lambda b: loss_fn(**b)) if compile else None

    def step_loss(batch: Batch) -> torch.Tensor:
        return eager_loss(batch) if traced is None else traced(prepare(batch))

    with param_scope(model, guide, publish=True):
        first = take(train, slice(0, batch_size))
        params = collect_params(eager_loss, first, model, guide, dev)
        optimizer = make_optimizer(params.values(), lr=lr)
        rows: list[dict[str, float]] = []
        start = 0
        if run is not None and resume:
            rows, start = run.restore(params, optimizer, settings, dev)
        elif run is not None:
            run.start(settings, metadata)
        steps_per_epoch = -(-total // batch_size)
        bar = tqdm(
            total=(epochs - start) * steps_per_epoch,
            disable=not progress,
            unit="step",
            desc="fit",
            dynamic_ncols=True,
        )
        first_step = True
        for epoch in range(start + 1, epochs + 1):
            order = _epoch_permutation(seed, epoch, total).to(dev)
            running = torch.zeros((), device=dev)
            tic = time.perf_counter()
            for step in range(steps_per_epoch):
                batch = take(train, order[step * batch_size : (step + 1) * batch_size])
                with pyro.validation_enabled(validate or first_step):
                    running += train_step(step_loss, optimizer, batch)
                first_step = False
                bar.update(1)
            train_loss = running.item() / total  # the one host sync of the epoch
            seconds = time.perf_counter() - tic
            if not np.isfinite(train_loss):
                raise FloatingPointError(
                    f"the training loss became {train_loss} in epoch {epoch}; lower lr (now {lr}) "
                    "or check the model for log(0) / division by zero. The last checkpoint holds "
                    "the previous epoch."
                )
            row = {"epoch": epoch, "train_loss": train_loss}
            if val is not None:
                row["val_elbo"] = float(mean_elbo(model, guide, val))
            row.update(seconds=seconds, examples_per_s=total / seconds)
            rows.append(row)
            bar.set_postfix(
                {k: f"{v:.2f}" for k, v in row.items() if k in ("train_loss", "val_elbo")}
            )
            if run is not None:
                run.save(epoch, rows, params, optimizer, dev)
        bar.close()
    history = pd.DataFrame(rows, columns=history_columns(val is not None))
    compiled = traced is not None and traced.failure is None
    return FitResult(model, guide, history, dict(params), dev, run.path if run else None, compiled)


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


def _check_callable(name: str, obj: Any) -> None:
    if not callable(obj):
        raise TypeError(f"{name} must be a Pyro {name} (a callable); got {type(obj).__name__}")


def _epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The data order of one epoch: a function of (seed, epoch) only, so resume replays it."""
    state = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return torch.randperm(n, generator=torch.Generator().manual_seed(state))
