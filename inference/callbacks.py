"""Callbacks on :func:`lvmkit.fit` and :func:`lvmkit.evaluate`, and experiment loggers.

A callback is any object with some of these methods (subclass :class:`Callback` to get no-op
defaults for the rest); ``fit`` and ``evaluate`` call them on the process that owns the run
(rank 0 under ``torchrun``):

- ``on_fit_start(info)``: a :class:`FitInfo` — the run's settings and metadata, its run
  directory, and the history so far (non-empty when resuming);
- ``on_epoch_end(epoch, metrics)``: after each epoch's row of the history (``train_loss``,
  ``val_elbo``, ``lr``, ``seconds``, …) was written; return ``True`` to stop training after this
  epoch (the checkpoint is already on disk, so ``resume=True`` continues from here);
- ``on_checkpoint(path, epoch, step)``: after ``checkpoint.pt`` was written (epoch ends and every
  ``checkpoint_every`` steps; only with a ``run_dir``);
- ``on_evaluation(summary, name)``: an :class:`~lvmkit.EvaluationSummary` from ``evaluate``
  (``name`` says which data: ``"test"`` by default);
- ``on_fit_end(history, error)``: the final history, and the exception if ``fit`` failed.

Loggers: :class:`MLflowLogger` (MLflow's tracking client: a SQLite file, a server, or any store
MLflow supports) and :class:`TensorBoardLogger` (event files for ``tensorboard --logdir``) — both
optional extras (``pip install 'lvmkit[mlflow]'`` / ``'lvmkit[tensorboard]'``).
:class:`EarlyStopping` stops on a metric that stopped improving.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lvmkit.base import check_choice, check_float, check_int

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from lvmkit.inference.summary import EvaluationSummary

CALLBACK_METHODS = ("on_fit_start", "on_epoch_end", "on_checkpoint", "on_evaluation", "on_fit_end")


@dataclass(frozen=True)
class FitInfo:
    """What a callback learns when training starts."""

    settings: dict[str, Any]  # fit's settings (objective, batch_size, lr, seed, …)
    metadata: dict[str, Any]  # what the caller passed as ``metadata``
    epochs: int  # the epoch training stops at
    run_dir: Path | None
    history: list[dict[str, float]] = field(default_factory=list)  # rows so far (resume)
    world_size: int = 1  # processes training together (torchrun)


class Callback:
    """Base class with no-op hooks; override the ones you need (see the module docstring).

    Example::

        >>> import torch, lvmkit
        >>> class Losses(lvmkit.Callback):
        ...     def __init__(self):
        ...         self.seen = []
        ...     def on_epoch_end(self, epoch, metrics):
        ...         self.seen.append(epoch)
        >>> config = lvmkit.VAEConfig(data_dim=4, latent_dim=2, hidden_dims=(8,))
        >>> model, guide = lvmkit.build_vae(config)
        >>> losses = Losses()
        >>> x = torch.bernoulli(torch.full((32, 4), 0.5))
        >>> _ = lvmkit.fit(model, guide, x, epochs=3, device="cpu", progress=False,
        ...                callbacks=[losses])
        >>> losses.seen
        [1, 2, 3]
    """

    def on_fit_start(self, info: FitInfo) -> None:
        """Training starts (or resumes)."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> bool | None:
        """An epoch ended; return True to stop training."""
        return None

    def on_checkpoint(self, path: Path, epoch: int, step: int) -> None:
        """A checkpoint was written (``step`` 0: at an epoch end)."""

    def on_evaluation(self, summary: EvaluationSummary, name: str) -> None:
        """``evaluate`` scored a data set."""

    def on_fit_end(self, history: pd.DataFrame, error: BaseException | None) -> None:
        """Training ended (``error`` is set when it raised)."""


def check_callbacks(callbacks: Any) -> list[Any]:
    """The callbacks as a list, each checked to have at least one hook."""
    if callbacks is None:
        return []
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(
            f"callbacks must be a list of callback objects; got {type(callbacks).__name__}"
        )
    for i, cb in enumerate(callbacks):
        if not any(callable(getattr(cb, name, None)) for name in CALLBACK_METHODS):
            raise TypeError(
                f"callbacks[{i}] ({type(cb).__name__}) has none of the callback methods "
                f"{list(CALLBACK_METHODS)}; subclass lvmkit.Callback"
            )
    return list(callbacks)


def notify(callbacks: Iterable[Any], method: str, *args: Any) -> list[Any]:
    """Call ``method`` on every callback that has it; return what they returned."""
    out = []
    for cb in callbacks:
        hook = getattr(cb, method, None)
        if callable(hook):
            out.append(hook(*args))
    return out


# -- early stopping ----------------------------------------------------------------------------


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    ``mode``: ``"max"`` for ELBOs (``val_elbo``, the default monitor), ``"min"`` for losses
    (``train_loss``). On resume the state is rebuilt from the history, so an interrupted run
    stops where an uninterrupted one would. ``stopped_epoch`` is set when it stopped training.

    Example::

        >>> import lvmkit
        >>> stop = lvmkit.EarlyStopping("val_elbo", patience=2)
        >>> [stop.on_epoch_end(e, {"val_elbo": v}) for e, v in enumerate([-9, -8, -8, -8.5], 1)]
        [False, False, False, True]
        >>> stop.stopped_epoch
        4
    """

    def __init__(
        self, monitor: str = "val_elbo", *, patience: int = 3, min_delta: float = 0.0, mode=None
    ) -> None:
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be a history column name (str); got {monitor!r}")
        self.monitor = monitor
        self.patience = check_int("patience", patience)
        self.min_delta = check_float("min_delta", min_delta, nonnegative=True)
        if mode is None:
            mode = "min" if monitor.endswith("loss") else "max"
        self.mode = check_choice("mode", mode, ("min", "max"))
        self.best = math.nan
        self.wait = 0
        self.stopped_epoch: int | None = None

    def on_fit_start(self, info: FitInfo) -> None:
        self.best, self.wait, self.stopped_epoch = math.nan, 0, None
        for row in info.history:
            self._update(int(row["epoch"]), row)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> bool:
        return self._update(epoch, metrics)

    def _update(self, epoch: int, metrics: dict[str, float]) -> bool:
        if self.monitor not in metrics:
            raise KeyError(
                f"EarlyStopping(monitor={self.monitor!r}): the history has no such column "
                f"(it has {sorted(metrics)}); pass validation_data to fit for 'val_elbo'"
            )
        value = float(metrics[self.monitor])
        sign = 1.0 if self.mode == "max" else -1.0
        if math.isnan(self.best) or sign * (value - self.best) > self.min_delta:
            self.best, self.wait = value, 0
            return False
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            return True
        return False


# -- loggers -----------------------------------------------------------------------------------


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    """Nested dicts as ``a.b.c`` keys (MLflow params and TensorBoard text are flat)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def _finite_metrics(metrics: dict[str, Any], skip: Sequence[str] = ("epoch",)) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if k not in skip and isinstance(v, (int, float)) and math.isfinite(float(v))
    }


class MLflowLogger(Callback):
    """Log a run to MLflow: settings and metadata as params, each epoch's history row as metrics
    (step = epoch), evaluation summaries as ``<name>_<field>`` metrics, and optionally the
    checkpoint file as an artifact.

    ``tracking_uri``: any MLflow store, e.g. ``"sqlite:///mlflow.db"`` (a local file; needs
    ``sqlalchemy`` and ``alembic``, which the ``mlflow`` extra installs) or a server's URL;
    ``None`` keeps MLflow's own default. The MLflow run is found again on resume (tagged with the
    run directory), so a resumed ``fit`` continues the same MLflow run. ``run_id`` is set once
    training starts. Uses MLflow's client API, so no global "active run" is left behind.
    ``artifact_location``: where a new experiment keeps artifacts (checkpoints); MLflow's default
    for a database store is ``./mlruns`` under the current directory.

    Example::

        >>> import logging, tempfile, torch, lvmkit
        >>> logging.getLogger("alembic").setLevel(logging.WARNING)
        >>> uri = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                  hidden_dims=(8,)))
        >>> logger = lvmkit.MLflowLogger(uri, experiment="demo")
        >>> _ = lvmkit.fit(model, guide, torch.ones(16, 4), epochs=2, device="cpu",
        ...                progress=False, callbacks=[logger])
        >>> [m.step for m in logger.client.get_metric_history(logger.run_id, "train_loss")]
        [1, 2]
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        experiment: str = "lvmkit",
        run_name: str | None = None,
        log_checkpoints: bool = False,
        artifact_location: str | None = None,
    ) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise ImportError(
                "MLflowLogger needs MLflow: pip install 'lvmkit[mlflow]' "
                "(mlflow-skinny with sqlalchemy and alembic for a SQLite store)"
            ) from err
        if tracking_uri is not None and not isinstance(tracking_uri, str):
            raise TypeError(f"tracking_uri must be a str or None; got {tracking_uri!r}")
        if artifact_location is not None and not isinstance(artifact_location, str):
            raise TypeError(f"artifact_location must be a str or None; got {artifact_location!r}")
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.artifact_location = artifact_location
        self.experiment, self.run_name = experiment, run_name
        self.log_checkpoints = bool(log_checkpoints)
        self.run_id: str | None = None

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(
            self.experiment, artifact_location=self.artifact_location
        )

    def on_fit_start(self, info: FitInfo) -> None:
        experiment_id = self._experiment_id()
        tag = str(info.run_dir.resolve()) if info.run_dir is not None else None
        if tag is not None and info.history:  # resuming: continue the run that started it
            escaped = tag.replace("'", "\\'")
            runs = self.client.search_runs(
                [experiment_id], filter_string=f"tags.`lvmkit.run_dir` = '{escaped}'"
            )
            if runs:
                self.run_id = runs[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                return
        tags = {"lvmkit.run_dir": tag} if tag is not None else {}
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        params = {**_flat("", info.settings), **_flat("metadata", info.metadata)}
        params["epochs"] = info.epochs
        params["world_size"] = info.world_size
        from mlflow.entities import Param

        self.client.log_batch(
            self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()]
        )

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self._log(_finite_metrics(metrics), step=epoch)

    def on_checkpoint(self, path: Path, epoch: int, step: int) -> None:
        if self.log_checkpoints and self.run_id is not None:
            self.client.log_artifact(self.run_id, str(path), artifact_path="checkpoints")

    def on_evaluation(self, summary: EvaluationSummary, name: str) -> None:
        from dataclasses import asdict

        values = {f"{name}_{k}": v for k, v in asdict(summary).items()}
        self._log(_finite_metrics(values, skip=()), step=0)

    def on_fit_end(self, history: pd.DataFrame, error: BaseException | None) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FAILED" if error else "FINISHED")

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None:
            raise RuntimeError("MLflowLogger has no run yet: pass it to fit(callbacks=[...]) first")
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)


class TensorBoardLogger(Callback):
    """Write TensorBoard event files under ``log_dir``: every history column as a scalar per
    epoch (``train/…``), evaluation summaries (``<name>/…``), and the settings as text. Uses
    ``torch.utils.tensorboard`` (needs the ``tensorboard`` package: ``lvmkit[tensorboard]``).

    Example::

        >>> import tempfile, torch, lvmkit
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                  hidden_dims=(8,)))
        >>> logger = lvmkit.TensorBoardLogger(tempfile.mkdtemp())
        >>> _ = lvmkit.fit(model, guide, torch.ones(16, 4), epochs=2, device="cpu",
        ...                progress=False, callbacks=[logger])
        >>> logger.close()
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "TensorBoardLogger needs TensorBoard: pip install 'lvmkit[tensorboard]'"
            ) from err
        if not isinstance(log_dir, (str, Path)):
            raise TypeError(f"log_dir must be a str or Path; got {type(log_dir).__name__}")
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.last_epoch = 0

    def on_fit_start(self, info: FitInfo) -> None:
        settings = {**_flat("", info.settings), **_flat("metadata", info.metadata)}
        text = "\n".join(f"    {k} = {v}" for k, v in sorted(settings.items()))
        self.writer.add_text("settings", text, global_step=len(info.history))
        self.last_epoch = len(info.history)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        for k, v in _finite_metrics(metrics).items():
            self.writer.add_scalar(f"train/{k}", v, global_step=epoch)
        self.last_epoch = epoch
        self.writer.flush()

    def on_evaluation(self, summary: EvaluationSummary, name: str) -> None:
        from dataclasses import asdict

        for k, v in _finite_metrics(asdict(summary), skip=()).items():
            self.writer.add_scalar(f"{name}/{k}", v, global_step=self.last_epoch)
        self.writer.flush()

    def on_fit_end(self, history: pd.DataFrame, error: BaseException | None) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
