"""The loop of ``fit``: epochs of steps, and what happens around them.

:class:`Loop` runs epochs of :meth:`~lvmkit.inference.step.Trainer.step` over minibatches taken by
index from the trainer's feeds (their data already on the device, no DataLoader), the order of
each pass a function of ``(seed, epoch, source, pass)`` only (:func:`epoch_order`), so that a
resumed run replays it. Around the step, as separate pieces:

- **check points** — at every epoch's end and every ``checkpoint_every`` steps: one host sync
  (the running loss and a finiteness check of it and every parameter), a snapshot (what a
  checkpoint holds and a rollback returns to), the checkpoint written to the run directory;
- **non-finite recovery** — roll back to the last snapshot, replay the steps one by one to find
  the epoch, step and first sample site of the non-finite value, then raise
  :class:`NonFiniteLossError` or (``on_nonfinite="reduce_lr"``) halve the rates and go on;
- **callbacks** — ``on_epoch_end`` (return True to stop) and ``on_checkpoint``;
- **several processes** — each its shard of the points, the running loss summed over them.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from lvmkit.inference import distributed
from lvmkit.inference.annealing import KLSchedule, LatentScale
from lvmkit.inference.callbacks import notify
from lvmkit.inference.calls import Data
from lvmkit.inference.evaluate import mean_elbo
from lvmkit.inference.feeds import Feed
from lvmkit.inference.rundir import RunDir, rng_state, set_rng_state
from lvmkit.inference.step import Trainer

NONFINITE_POLICIES = ("raise", "reduce_lr")
LR_REDUCTION = 0.5  # on_nonfinite="reduce_lr": the factor applied to lr after each rollback
MAX_LR_REDUCTIONS = 5  # ... and how many times before giving up with NonFiniteLossError


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


def epoch_order(seed: int, epoch: int, n: int, *, source: int = 0, cycle: int = 0) -> torch.Tensor:
    """The order in which one pass of an epoch takes a source's points: a function of the seed,
    the epoch, the source and the pass only, so that resume replays it."""
    key = [seed, epoch] if source == 0 and cycle == 0 else [seed, epoch, source, cycle]
    state = int(np.random.SeedSequence(key).generate_state(1)[0])
    return torch.randperm(n, generator=torch.Generator().manual_seed(state))


@dataclass(frozen=True)
class LoopOptions:
    """How the loop runs around its steps (fit's options of the same names)."""

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
    holds (see :meth:`Loop.snapshot`)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed in epoch ``epoch + 1``
    running: torch.Tensor | None = None  # this epoch's summed step losses, on the device
    running_value: float = 0.0  # ``running`` as last read on the host (summed over processes)
    elapsed: float = 0.0  # seconds spent in this epoch's steps
    history: list[dict[str, float]] = field(default_factory=list)
    lr_reductions: int = 0


class Loop:
    """Epochs of steps, and the check points around them (see the module docstring)."""

    def __init__(
        self,
        trainer: Trainer,
        model: Any,
        guide: Any,
        options: LoopOptions,
        *,
        seed: int,
        dev: torch.device,
        world: distributed.World,
        run: RunDir | None,
        val: Feed | None,
        val_total: int,
        schedule: list[int] | None = None,
    ) -> None:
        self.trainer, self.options = trainer, options
        feeds = trainer.feeds
        self.model, self.guide = model, guide  # as given: validation scores the true ELBO
        self.seed, self.dev, self.world, self.rundir = seed, dev, world, run
        self.val, self.val_total = val, val_total
        self.kl_weight: float | None = None  # at the last step
        self.stopped = False  # a callback asked to stop
        # steps an epoch: as many as the source that needs most (a shard of it per process)
        # (Interleaved sources: each minibatch a step, in the schedule's order)
        self.schedule = schedule
        self.positions = _positions(schedule) if schedule is not None else None
        self.steps_per_epoch = (
            len(schedule) if schedule is not None else max(self._steps(f) for f in feeds)
        )
        self.total = sum(f.num_points or 1 for f in feeds)  # points of an epoch, all processes
        self.represented = self._represented()  # what an epoch's losses stand for, per process
        self.progress = Progress(running=torch.zeros((), device=dev))
        self.orders: dict[tuple[int, int], torch.Tensor] = {}  # this epoch's: (source, pass)
        self.good: dict[str, Any] = {}  # the last snapshot: where a rollback returns to

    def _steps(self, feed: Feed) -> int:
        """Steps to pass one source once (its shard of the points, under several processes)."""
        if feed.batch_size is None or feed.shares is not None:
            return feed.steps
        shard = distributed.shard_size(self.world, feed.num_points or 1)
        return -(-shard // int(feed.batch_size))

    def _represented(self) -> float:
        """Points an epoch's summed losses stand for, on one process."""
        total = 0.0
        if self.schedule is not None and self.positions is not None:
            for index, position in zip(self.schedule, self.positions, strict=True):
                feed = self.trainer.feeds[index]
                total += feed.represented(self._batch_points(feed, position))
            return total
        for feed in self.trainer.feeds:
            for step in range(self.steps_per_epoch):
                points = self._batch_points(feed, step)
                total += feed.represented(points) if points else 0.0
        return total

    def _batch_points(self, feed: Feed, step: int) -> int:
        if feed.batch_size is None:
            return feed.num_points or 1
        n = distributed.shard_size(self.world, feed.num_points or 1)
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
            state["ranks"] = distributed.gather(self.world, own)
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
                        self._recover()
                        rolled_back = True
                        break
                    if end:
                        self._end_epoch(bar)
                    self._check_point()
                    if end:
                        row = dict(p.history[-1])
                        replies = notify(self.options.callbacks, "on_epoch_end", p.epoch, row)
                        stop = any(reply is True for reply in replies)  # (rank 0's callbacks)
                        self.stopped = distributed.any_rank(self.world, stop)
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
        if self.schedule is not None and self.positions is not None:  # one source a step
            index, position = self.schedule[p.step], self.positions[p.step]
            feed = self.trainer.feeds[index]
            order = self._order(index, feed, 0) if feed.batch_size else None
            batch = feed.batch(order, position)
            return [batch] if batch is not None else []
        out = []
        for index, feed in enumerate(self.trainer.feeds):
            steps = self._steps(feed)
            order = self._order(index, feed, p.step // steps) if feed.batch_size else None
            batch = feed.batch(order, p.step % steps)
            if batch is not None:  # (an even share may leave a source out of a step)
                out.append(batch)
        return out

    def _order(self, index: int, feed: Feed, cycle: int) -> torch.Tensor:
        key = (index, cycle)
        if key not in self.orders:
            epoch, n = self.progress.epoch + 1, feed.num_points or 1
            if self.world.distributed:
                order = distributed.epoch_order(self.world, self.seed, epoch, n)
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
        summed = distributed.all_sum(self.world, torch.stack([running, bad]))
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
            self.model, self.guide, val.data, plate=self.options.data_plate,
            transform=val.transform, placement=val.placement,
        )  # fmt: skip
        if not self.world.distributed:
            return float(local)
        total = distributed.all_sum(self.world, local * (val.data.num_points or 1))
        return float(total) / self.val_total

    def _check_point(self) -> None:
        """Snapshot the state as the one to roll back to; write it to the run directory."""
        p = self.progress
        self.good = self.snapshot()
        if self.rundir is not None:
            self.rundir.save(self.good)
            notify(self.options.callbacks, "on_checkpoint", self.rundir.checkpoint, p.epoch, p.step)

    # -- non-finite values: roll back, find where, go on or stop ------------------------------

    def _recover(self) -> None:
        """Roll back to the last good snapshot; find the step and site; raise or lower the lr."""
        p, optim = self.progress, self.trainer.optim
        bad_epoch = p.epoch + 1
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
            if not p.history and not p.step and not p.epoch
            else f"the checkpoint in epoch {p.epoch + 1}, after step {p.step}"
            if p.step
            else f"the checkpoint after epoch {p.epoch}"
        )
        lr = optim.lr
        reduce = self.options.on_nonfinite == "reduce_lr" and lr is not None
        if reduce and p.lr_reductions < MAX_LR_REDUCTIONS:
            assert lr is not None
            warnings.warn(
                f"{where}; rolled back to {rolled} and continuing with "
                f"lr {lr:g} → {lr * LR_REDUCTION:g} (reduction "
                f"{p.lr_reductions + 1} of at most {MAX_LR_REDUCTIONS})",
                RuntimeWarning,
                stacklevel=4,
            )
            optim.scale_lr(LR_REDUCTION)
            p.lr_reductions += 1
            self.good = self.snapshot()
            if self.rundir is not None:
                self.rundir.save(self.good)
            return
        advice = (
            f"on_nonfinite='reduce_lr' already lowered the lr {MAX_LR_REDUCTIONS} times (now "
            f"{lr:g})"
            if reduce and lr is not None
            else "the optimizer has no learning rate (lr) for on_nonfinite='reduce_lr' to lower"
            if lr is None
            else f"Lower lr (now {lr:g}), or pass on_nonfinite='reduce_lr' to lower it "
            "automatically"
        )
        saved = f" ({self.rundir.checkpoint} holds it)" if self.rundir is not None else ""
        raise NonFiniteLossError(
            f"{where}. The model, guide and optimizer were rolled back to {rolled}{saved}. "
            f"{advice}, or check the model "
            "for log(0), division by zero or overflow.",
            epoch=epoch,
            step=step,
            site=site,
        )

    def _locate(self, bad_epoch: int) -> tuple[str, int, int | None, str | None]:
        """Replay the steps from the last snapshot to the end of ``bad_epoch`` one at a time,
        checking each on the host; return a description and the epoch, step and sample site of the
        first non-finite value (step and site None where the replay cannot tell)."""
        p, trainer = self.progress, self.trainer
        while p.epoch < bad_epoch:
            before = rng_state(self.dev)
            calls = self.calls()
            epoch, step = p.epoch + 1, p.step + 1
            at = f"epoch {epoch}, step {step} of {self.steps_per_epoch}"
            with pyro.validation_enabled(False):
                loss = trainer.loss(calls)
                trainer.optim.zero_grad()
                loss.backward()
            problem = None
            if not bool(torch.isfinite(loss.detach())):
                problem = f"the loss became {loss.detach().item():g}"
            else:
                for name, param in trainer.params.items():
                    if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
                        problem = f"the gradient of parameter {name!r} became non-finite"
                        break
            if problem is None:
                trainer.optim.step()
                for name, param in trainer.params.items():
                    if not bool(torch.isfinite(param).all()):
                        problem = f"the optimizer step made parameter {name!r} non-finite"
                        break
            if problem is not None:
                # draw this step's samples again; the caller restores the whole state after
                set_rng_state(before, self.dev)
                calls = self.calls()  # (a transform draws again what it drew in the step)
                with torch.no_grad(), pyro.validation_enabled(False):
                    site = None
                    model, guide = trainer.scored
                    for call in calls:
                        site = first_nonfinite_site(trainer.objective, model, guide, call)
                        if site is not None:
                            break
                found = f", first at sample site {site[0]!r} ({site[1]})" if site else ""
                message = f"non-finite values in {at}: {problem}{found}"
                return message, epoch, step, site[0] if site else None
            p.step += 1
            if p.step == self.steps_per_epoch:
                p.epoch, p.step, self.orders = p.epoch + 1, 0, {}
        message = (
            f"the loss or parameters became non-finite by the end of epoch {bad_epoch}, but "
            "replaying the steps one by one did not reproduce it (non-deterministic kernels?)"
        )
        return message, bad_epoch, None, None


def _positions(schedule: list[int]) -> list[int]:
    """For each step of an interleaved epoch, its source's minibatch number."""
    seen: dict[int, int] = {}
    out = []
    for index in schedule:
        out.append(seen.get(index, 0))
        seen[index] = out[-1] + 1
    return out


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


def first_nonfinite_site(elbo, model, guide, call: Data) -> tuple[str, str] | None:
    """The first sample site (guide first, then model) with a non-finite value or log-density,
    drawn exactly as the objective draws them under the current random state."""
    try:
        model_trace, guide_trace = next(
            iter(elbo._get_traces(model, guide, call.args, call.kwargs))
        )
    except Exception as err:  # a model that fails outright on non-finite parameters
        return ("?", f"the model/guide raised {type(err).__name__}: {err}")
    for role, trace in (("guide", guide_trace), ("model", model_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            value: Any = site["value"]
            if torch.is_tensor(value) and not bool(torch.isfinite(value).all()):
                return name, f"{role}: its value is non-finite"
            log_prob = site["fn"].log_prob(value)
            if not bool(torch.isfinite(log_prob).all()):
                bad = log_prob[~torch.isfinite(log_prob)].flatten()[0].item()
                return name, f"{role}: its log-density is {bad}"
    return None
