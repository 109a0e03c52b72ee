"""When a loss, gradient or parameter turns NaN or infinite: roll back, find where, go on or stop.

The loop checks finiteness only at its check points (one host sync each). When a check fails,
:func:`recover` rolls the run back to the last good snapshot, replays the steps since one at a
time on the host to find the epoch, step and first sample site (drawn exactly as the objective
drew it) where the non-finite value appeared, rolls back again, and then either halves the
learning rates and goes on (``on_nonfinite="reduce_lr"``, at most :data:`MAX_LR_REDUCTIONS` times)
or raises :class:`NonFiniteLossError`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import pyro
import torch
from pyro.poutine.util import site_is_subsample

from lvmkit.inference._data import Data
from lvmkit.inference._rundir import rng_state, set_rng_state

if TYPE_CHECKING:  # pragma: no cover
    from lvmkit.inference.train import _Loop

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


def recover(loop: _Loop) -> None:
    """Roll back to the last good snapshot; find the step and site; raise or lower the lr."""
    p, optim = loop.progress, loop.trainer.optim
    bad_epoch = p.epoch + 1
    loop.restore(loop.good)
    if loop.world.distributed:  # a replay step by step would need every process in step
        where, epoch, step, site = (
            f"the loss or parameters became non-finite in epoch {bad_epoch} (not located to a "
            f"step: training runs in {loop.world.size} processes)",
            bad_epoch,
            None,
            None,
        )
    else:
        where, epoch, step, site = locate(loop, bad_epoch)
        loop.restore(loop.good)
    rolled = (
        "the start of training"
        if not p.history and not p.step and not p.epoch
        else f"the checkpoint in epoch {p.epoch + 1}, after step {p.step}"
        if p.step
        else f"the checkpoint after epoch {p.epoch}"
    )
    lr = optim.lr
    if loop.options.on_nonfinite == "reduce_lr" and p.lr_reductions < MAX_LR_REDUCTIONS:
        warnings.warn(
            f"{where}; rolled back to {rolled} and continuing with "
            f"lr {lr:g} → {lr * LR_REDUCTION:g} (reduction "
            f"{p.lr_reductions + 1} of at most {MAX_LR_REDUCTIONS})",
            RuntimeWarning,
            stacklevel=4,
        )
        optim.scale_lr(LR_REDUCTION)
        p.lr_reductions += 1
        loop.good = loop.snapshot()
        if loop.rundir is not None:
            loop.rundir.save(loop.good)
        return
    advice = (
        f"on_nonfinite='reduce_lr' already lowered the lr {MAX_LR_REDUCTIONS} times"
        if loop.options.on_nonfinite == "reduce_lr"
        else "Lower lr, or pass on_nonfinite='reduce_lr' to lower it automatically"
    )
    saved = f" ({loop.rundir.checkpoint} holds it)" if loop.rundir is not None else ""
    raise NonFiniteLossError(
        f"{where}. The model, guide and optimizer were rolled back to {rolled}{saved}. "
        f"{advice} (now {lr:g}), or check the model "
        "for log(0), division by zero or overflow.",
        epoch=epoch,
        step=step,
        site=site,
    )


def locate(loop: _Loop, bad_epoch: int) -> tuple[str, int, int | None, str | None]:
    """Replay the steps from the last snapshot to the end of ``bad_epoch`` one at a time,
    checking each on the host; return a description and the epoch, step and sample site of the
    first non-finite value (step and site None where the replay cannot tell)."""
    p, trainer = loop.progress, loop.trainer
    while p.epoch < bad_epoch:
        before = rng_state(loop.dev)
        calls = loop.calls()
        epoch, step = p.epoch + 1, p.step + 1
        at = f"epoch {epoch}, step {step} of {loop.steps_per_epoch}"
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
            set_rng_state(before, loop.dev)
            calls = loop.calls()  # (a transform draws again what it drew in the step)
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
        if p.step == loop.steps_per_epoch:
            p.epoch, p.step, loop.orders = p.epoch + 1, 0, {}
    message = (
        f"the loss or parameters became non-finite by the end of epoch {bad_epoch}, but "
        "replaying the steps one by one did not reproduce it (non-deterministic kernels?)"
    )
    return message, bad_epoch, None, None


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
