"""The optimizer, its learning-rate schedule and gradient clipping of a ``fit``: any torch or Pyro
optimizer, with its state in every checkpoint.

``fit(optimizer=...)`` takes

- nothing: Adam, fused into one kernel per step where torch has that kernel for every parameter
  (the default, and the fastest on a CPU);
- a ``torch.optim.Optimizer`` class (``torch.optim.AdamW``) or a factory called with the parameter
  groups (``functools.partial(torch.optim.SGD, momentum=0.9)``), with ``optimizer_args``;
- a Pyro optimizer (``pyro.optim.Adam({"lr": 1e-3, "betas": (0.95, 0.999)})``,
  ``pyro.optim.ClippedAdam({"lr": 3e-4, "clip_norm": 10.0, "lrd": 0.99996})``), with its own
  arguments, per-parameter ones included, and its ``clip_args`` (which clip each parameter's own
  gradient, as Pyro does);
- a Pyro scheduler (``pyro.optim.ExponentialLR({"optimizer": torch.optim.SGD, "optim_args":
  {"lr": 0.1}, "gamma": 0.99})``): its optimizer, and its schedule stepped once per epoch.

``scheduler`` is a ``torch.optim.lr_scheduler`` class or factory (called with the optimizer and
``scheduler_args``), stepped at each epoch's end or after each step (``scheduler_interval``);
``ReduceLROnPlateau`` is stepped with the epoch's validation loss (−``val_elbo``) when there is
validation data, else with ``train_loss``. ``clip_norm`` clips the norm of all gradients together
before each update (``torch.nn.utils.clip_grad_norm_``).

Where the pair has an ``adversary`` module (the AAE's discriminator), its parameters form their
own parameter group with the pair's ``adversary_lr``: one optimizer, two learning rates.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pyro.optim
import torch
from pyro.params.param_store import (
    module_from_param_with_module_name,
    normalize_param_name,
    user_param_name,
)
from torch import nn
from torch.nn.utils import clip_grad_norm_, clip_grad_value_

from lvmkit.base import check_choice, check_float

INTERVALS = ("epoch", "step")


@dataclass(frozen=True)
class OptimSpec:
    """What ``fit`` was asked for: checked once, built into an :class:`Optim` per parameter set."""

    optimizer: Any = None
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    scheduler: Any = None
    scheduler_args: dict[str, Any] = field(default_factory=dict)
    interval: str = "epoch"
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        opt = self.optimizer
        pyro_opt = isinstance(opt, pyro.optim.PyroOptim)
        if isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                "optimizer must be the class or a factory, not an optimizer already built over "
                f"some parameters; got a {type(opt).__name__} instance: pass "
                f"torch.optim.{type(opt).__name__} and its settings in optimizer_args"
            )
        if opt is not None and not pyro_opt and not callable(opt):
            raise TypeError(
                "optimizer must be None (fused Adam), a torch.optim.Optimizer class or factory, "
                f"or a pyro.optim optimizer; got {type(opt).__name__}"
            )
        for name, value in (("optimizer_args", self.optimizer_args),
                            ("scheduler_args", self.scheduler_args)):  # fmt: skip
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise TypeError(f"{name} must be a dict of keyword arguments; got {value!r}")
        if pyro_opt and self.optimizer_args:
            raise ValueError(
                "optimizer_args is for torch optimizers: a pyro.optim optimizer carries its own "
                "arguments (e.g. pyro.optim.Adam({'lr': 1e-3, 'betas': (0.9, 0.999)}))"
            )
        if self.lr is not None:
            check_float("lr", self.lr)
            if pyro_opt:
                raise ValueError(
                    "lr is set by the pyro.optim optimizer's own arguments; leave fit's lr out"
                )
            if "lr" in self.optimizer_args:
                raise ValueError("lr is given twice: as fit's lr and in optimizer_args")
        if self.scheduler is not None:
            if isinstance(opt, pyro.optim.PyroLRScheduler):
                raise ValueError(
                    "the pyro.optim scheduler given as optimizer already has its schedule; "
                    "leave scheduler= out"
                )
            if not callable(self.scheduler):
                raise TypeError(
                    "scheduler must be a torch.optim.lr_scheduler class or a factory called with "
                    f"the optimizer; got {type(self.scheduler).__name__}"
                )
        elif self.scheduler_args:
            raise ValueError("scheduler_args given without a scheduler")
        check_choice("scheduler_interval", self.interval, INTERVALS)
        if self.clip_norm is not None:
            check_float("clip_norm", self.clip_norm)

    def describe(self) -> dict[str, Any]:
        """The settings a resumed run must share (stored in ``config.json`` and checkpoints)."""
        return {
            "optimizer": _name(self.optimizer, self.optimizer_args),
            "scheduler": (
                None
                if self.scheduler is None
                and not isinstance(self.optimizer, pyro.optim.PyroLRScheduler)
                else f"{_name(self.scheduler, self.scheduler_args)} per {self.interval}"
            ),
            "clip_norm": self.clip_norm,
        }


def _name(obj: Any, args: dict[str, Any]) -> str:
    if obj is None:
        base = "Adam"
    elif isinstance(obj, pyro.optim.PyroLRScheduler):
        base = (
            f"pyro.optim {_title(obj.pt_scheduler_constructor)}"
            f"({_args(obj.kwargs)}) of {_title(obj.pt_optim_constructor)}"
        )
        return f"{base}({_args(obj.pt_optim_args)})"
    elif isinstance(obj, pyro.optim.PyroOptim):
        base = f"pyro.optim {_title(obj.pt_optim_constructor)}"
        args = obj.pt_optim_args if isinstance(obj.pt_optim_args, dict) else {"per_param": "…"}
    elif isinstance(obj, partial):
        base = getattr(obj.func, "__name__", type(obj.func).__name__)
        args = {**obj.keywords, **args}
    else:
        base = getattr(obj, "__name__", type(obj).__name__)
    return f"{base}({_args(args)})" if args else base


def _title(fn: Any) -> str:
    return str(getattr(fn, "__name__", type(fn).__name__))


def _args(args: Any) -> str:
    if not isinstance(args, dict):
        return "…"
    return ", ".join(f"{k}={v!r}" for k, v in sorted(args.items()))


RATE_KEYS = ("lr", "eta")  # what optimizers call their learning rate (eta: AdagradRMSProp's)


def rate_key(group: dict[str, Any]) -> str | None:
    """The name of a parameter group's learning rate, or None where it has none."""
    return next((key for key in RATE_KEYS if isinstance(group.get(key), (int, float))), None)


class Optim:
    """A torch optimizer with its schedule and clipping: what a training step drives."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        interval: str,
        clip_norm: float | None,
        per_param_clip: list[tuple[torch.Tensor, dict[str, Any]]],
    ) -> None:
        self.optimizer, self.scheduler, self.interval = optimizer, scheduler, interval
        self.clip_norm, self.per_param_clip = clip_norm, per_param_clip
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.before_step: Callable[[], None] | None = None  # e.g. averaging over processes
        self.last_lr = self.lr  # the learning rate of the last update (before its schedule moved)
        self.version = 0  # counts load_state_dict calls: a compiled step gathers the state again
        self.plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """Clip (if asked), update, and step a per-step schedule."""
        if self.before_step is not None:
            self.before_step()
        if self.clip_norm is not None:
            clip_grad_norm_(self.params, self.clip_norm)
        for param, args in self.per_param_clip:
            if param.grad is not None:
                if args.get("clip_norm") is not None:
                    clip_grad_norm_(param, args["clip_norm"])
                if args.get("clip_value") is not None:
                    clip_grad_value_(param, args["clip_value"])
        self.optimizer.step()
        self.stepped()

    def stepped(self) -> None:
        """After an update (eager, or inside a compiled step): note the rate it used and step a
        per-step schedule."""
        self.last_lr = self.lr  # (a host float: no sync)
        if self.scheduler is not None and self.interval == "step" and not self.plateau:
            self.scheduler.step()

    def end_epoch(self, metrics: dict[str, float]) -> None:
        """Step a per-epoch schedule (a plateau schedule on the epoch's loss)."""
        if self.scheduler is None:
            return
        if self.plateau:
            loss = -metrics["val_elbo"] if "val_elbo" in metrics else metrics["train_loss"]
            self.scheduler.step(loss)
        elif self.interval == "epoch":
            self.scheduler.step()

    @property
    def lr(self) -> float | None:
        """The first parameter group's learning rate now (None for an optimizer without one)."""
        group = self.optimizer.param_groups[0]
        key = rate_key(group)
        return float(group[key]) if key is not None else None

    def scale_lr(self, factor: float) -> bool:
        """Multiply every group's learning rate (and the schedule's base rates) by ``factor``:
        a schedule goes on from the lowered level; an adversary keeps its ratio. False (nothing
        changed) for an optimizer without a rate."""
        if self.lr is None:
            return False
        self.last_lr = self.last_lr * factor if self.last_lr is not None else None
        for group in self.optimizer.param_groups:
            key = rate_key(group)
            if key is not None:
                group[key] = group[key] * factor
            if "initial_lr" in group:
                group["initial_lr"] = group["initial_lr"] * factor
        if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.version += 1
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.last_lr = self.lr


def build(spec: OptimSpec, params: dict[str, torch.Tensor], model: Any, guide: Any) -> Optim:
    """The optimizer of ``spec`` over ``params`` (names as ``fit`` reports them)."""
    groups = _groups(params, model, guide)
    opt = spec.optimizer
    per_param_clip: list[tuple[torch.Tensor, dict[str, Any]]] = []
    scheduler: Any = None
    interval = spec.interval
    if isinstance(opt, pyro.optim.PyroOptim):
        groups = _pyro_groups(opt, groups)
        constructor: Any = opt.pt_optim_constructor
        optimizer = constructor(_torch_groups(groups))
        per_param_clip = _pyro_clip(opt, groups)
        if isinstance(opt, pyro.optim.PyroLRScheduler):
            scheduler, interval = opt.pt_scheduler_constructor(optimizer, **opt.kwargs), "epoch"
    elif opt is None:
        extra = {"lr": spec.lr} if spec.lr is not None else {}
        optimizer = _fused_adam(_torch_groups(groups), {**extra, **spec.optimizer_args})
    else:
        extra = {"lr": spec.lr} if spec.lr is not None and _takes_lr(opt) else {}
        optimizer = opt(_torch_groups(groups), **extra, **spec.optimizer_args)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "the optimizer factory must return a torch.optim.Optimizer; "
                f"got {type(optimizer).__name__}"
            )
    if spec.scheduler is not None:
        scheduler = spec.scheduler(optimizer, **spec.scheduler_args)
    return Optim(optimizer, scheduler, interval, spec.clip_norm, per_param_clip)


def _torch_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parameter groups as torch takes them (our parameter names kept aside)."""
    return [{k: v for k, v in group.items() if k != "names"} for group in groups]


def _fused_adam(groups: list[dict[str, Any]], args: dict[str, Any]) -> torch.optim.Adam:
    """Adam, fused into one kernel per step where torch has that kernel for every parameter."""
    try:
        return torch.optim.Adam(groups, fused=True, **args)
    except RuntimeError:  # a device or dtype without the fused kernel: the foreach version
        return torch.optim.Adam(groups, **args)


def _takes_lr(factory: Callable[..., Any]) -> bool:
    if isinstance(factory, partial) and "lr" in factory.keywords:
        return False
    if inspect.isclass(factory):
        return True
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "lr" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _groups(params: dict[str, torch.Tensor], model: Any, guide: Any) -> list[dict[str, Any]]:
    """One parameter group; two where model or guide has an ``adversary`` module."""
    owners = [
        obj for obj in (model, guide) if isinstance(getattr(obj, "adversary", None), nn.Module)
    ]
    named = list(params.items())
    if not owners:
        return [{"params": [p for _, p in named], "names": [n for n, _ in named]}]
    if len(owners) > 1:
        raise ValueError("only one of model and guide may define an adversary")
    owner = owners[0]
    ids = {id(p) for p in owner.adversary.parameters()}
    main = [(n, p) for n, p in named if id(p) not in ids]
    adversary = [(n, p) for n, p in named if id(p) in ids]
    if not adversary or not main:
        raise ValueError("the adversary must own some, but not all, of the trainable parameters")
    adversary_lr = check_float("adversary_lr", getattr(owner, "adversary_lr", 1e-3))
    return [
        {"params": [p for _, p in main], "names": [n for n, _ in main]},
        {"params": [p for _, p in adversary], "names": [n for n, _ in adversary],
         "lr": adversary_lr},
    ]  # fmt: skip


def _pyro_groups(opt: pyro.optim.PyroOptim, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A Pyro optimizer's arguments as parameter groups: its dict for all, or its per-parameter
    callable's dict for each parameter (called with Pyro's names, as Pyro calls it)."""
    args = opt.pt_optim_args
    out: list[dict[str, Any]] = []
    for group in groups:
        own = {k: v for k, v in group.items() if k not in ("params", "names")}
        if not callable(args):
            out.append({"params": group["params"], "names": group["names"], **args, **own})
            continue
        for name, param in zip(group["names"], group["params"], strict=True):
            out.append({"params": [param], "names": [name], **_per_param(opt, name), **own})
    return out


def _per_param(opt: pyro.optim.PyroOptim, name: str) -> dict[str, Any]:
    fn: Any = opt.pt_optim_args
    if getattr(opt, "pt_optim_args_argc", 2) == 1:
        out = fn(normalize_param_name(name))
    else:
        out = fn(module_from_param_with_module_name(name), user_param_name(name))
    if not isinstance(out, dict):
        raise TypeError(f"the per-parameter optim_args must return a dict; got {out!r} for {name}")
    return out


def _pyro_clip(
    opt: pyro.optim.PyroOptim, groups: Iterable[dict[str, Any]]
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Pyro's ``clip_args``: each parameter's own gradient clipped, as ``PyroOptim`` does."""
    clip = opt.pt_clip_args
    if not clip:
        return []
    out = []
    for group in groups:
        for name, param in zip(group["names"], group["params"], strict=True):
            if callable(clip):
                args = clip(module_from_param_with_module_name(name), user_param_name(name))
            else:
                args = clip
            if args:
                out.append((param, dict(args)))
    return out
