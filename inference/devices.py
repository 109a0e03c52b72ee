"""Where a fit or an evaluation runs: the device policy, in one place.

- **By default nothing moves** (``device=None``), as with Pyro's own ``SVI``: a fit runs where the
  data and the pair's parameters already are, so CPU tensors train on the CPU on a GPU machine
  too, and data already on ``cuda:0`` train there. Data and parameters on different devices are
  an error before training that names which tensor is where. An evaluation runs where the pair's
  parameters are: its data are copied there chunk by chunk (reading them moves nothing the user
  holds) and the pair's code runs with that device as torch's default.
- **An explicit** ``device=`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, or ``"auto"``: CUDA when there
  is one) moves the data and the pair's networks there — the model and guide when they are
  modules (PyroModules, autoguides), every network registered with ``pyro.module`` and every
  ``pyro.param`` tensor, in place, as they are first used — and runs the model, the guide and
  ``transform`` with that device as torch's default device, so that tensors the user's code makes
  without ``device=`` (``torch.ones(k)``, ``torch.arange(t)``) land there too. One log line says
  what moved.
- lvmkit's own entry points (the CLI, the benchmarks) pass ``"auto"`` for their own models.

A device mismatch raised inside the user's code is reported with the function and sample site
where it happened, and the fix (:func:`explain_mismatch`).
"""

from __future__ import annotations

import logging
import os
import sysconfig
import traceback
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

_log = logging.getLogger("lvmkit")
DEVICES = "None (where the data and parameters are), 'auto', 'cpu', 'cuda' or 'cuda:N'"


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA when present, else CPU; ``"cuda"`` without CUDA is an error."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be {DEVICES}; got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must be {DEVICES}; got {device!r}") from err
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be {DEVICES}; got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} but this torch build sees no CUDA device; "
                "use device='auto' or 'cpu'"
            )
        if resolved.index is None:  # "cuda" is the current CUDA device: say which
            resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


@dataclass
class Placement:
    """Where a fit or an evaluation runs, and whether it was asked to move things there.

    ``moves``: an explicit ``device=`` was given; the data and the pair's networks are moved to
    ``device``. ``sets_default`` (default: ``moves``): the user's code runs with ``device`` as
    torch's default device (:meth:`scope`) — with an explicit device, and in an evaluation, which
    runs where the pair is and copies its data there.
    """

    device: torch.device
    moves: bool = False
    sets_default: bool | None = None
    moved: dict[str, list[str]] = field(default_factory=dict)  # what → names, for the one line

    def __post_init__(self) -> None:
        self._default = torch.empty(0).device  # torch's default device when the run started
        if self.sets_default is None:
            self.sets_default = self.moves

    @property
    def _context(self) -> bool:
        # the user's code needs torch's default device set only where it differs from ours
        return bool(self.sets_default) and self._default != self.device

    def scope(self) -> AbstractContextManager[Any]:
        """The user's model, guide or transform runs inside this: with an explicit device, that
        device as torch's default (tensors made without ``device=`` land there)."""
        return torch.device(self.device) if self._context else nullcontext()

    @contextmanager
    def first_use(self) -> Iterator[None]:
        """Around the pair's first calls: with an explicit device, every network whose forward
        runs and every ``pyro.param`` tensor (``pyro.module`` registers its network's parameters
        so) is moved to the device, in place, before it computes (and :meth:`scope` holds)."""
        with ExitStack() as stack:
            stack.enter_context(self.scope())
            if self.moves:
                stack.enter_context(_Mover(self))
                stack.enter_context(_moving_modules(self))
            yield

    def note(self, what: str, name: str) -> None:
        names = self.moved.setdefault(what, [])
        if name not in names:
            names.append(name)

    def say(self, who: str) -> None:
        """One log line: what ``who`` (fit, evaluate) moved to the device."""
        if not self.moved:
            return
        parts = []
        for what, names in self.moved.items():
            shown = ", ".join(names[:4]) + (f", … ({len(names)} in all)" if len(names) > 4 else "")
            parts.append(f"{what} ({shown})")
        context = (
            f"; the model, guide and transform run with {self.device} as torch's default device"
            if self._context
            else ""
        )
        _log.warning("lvmkit: %s moved to %s: %s%s", who, self.device, "; ".join(parts), context)
        self.moved = {}


def place(
    device: str | torch.device | None,
    model: Any,
    guide: Any,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    who: str = "fit",
) -> Placement:
    """The :class:`Placement` of a fit on data holding ``tensors`` (label, tensor): ``device``
    if given (the pair's modules and param-store tensors are moved there now), else where the
    data and the parameters already are — an error naming them when they disagree."""
    if device is not None:
        placement = Placement(
            resolve_device(device), moves=True, sets_default=_user_code(model, guide)
        )
        move_pair(placement, model, guide)
        return placement
    where: dict[torch.device, list[str]] = {}
    for label, tensor in [*tensors, *_parameters(model, guide)]:
        where.setdefault(tensor.device, []).append(label)
    if len(where) > 1:
        found = "; ".join(
            f"{', '.join(labels[:3])}{', …' if len(labels) > 3 else ''} on {dev}"
            for dev, labels in where.items()
        )
        devices = " or ".join(repr(str(d)) for d in where)
        raise ValueError(
            f"the data and the pair's parameters are on different devices: {found}. {who} "
            "moves nothing unless asked (device=None, as Pyro's SVI): move them to one device "
            f"yourself (tensor.to(...), module.to(...)), or pass device={devices} to move the "
            "data and the pair's networks there"
        )
    return Placement(next(iter(where), torch.device("cpu")))


def pair_placement(model: Any, guide: Any, device: str | torch.device | None) -> Placement:
    """Where an evaluation runs: ``device`` (the pair moved there), else where the pair's
    parameters are. Either way its data are copied there chunk by chunk, and the model, guide
    and transform run with that device as torch's default (a pair trained with
    ``fit(device="cuda")`` is scored on CUDA even when its code makes tensors without
    ``device=``)."""
    user = _user_code(model, guide)
    if device is not None:
        placement = Placement(resolve_device(device), moves=True, sets_default=user)
        move_pair(placement, model, guide)
        return placement
    return Placement(pair_device(model, guide), sets_default=user)


def pair_device(model: Any, guide: Any, device: str | torch.device | None = None) -> torch.device:
    """Where :func:`pair_placement` puts an evaluation, without moving anything."""
    if device is not None:
        return resolve_device(device)
    for _, tensor in _parameters(model, guide):
        return tensor.device
    return torch.device("cpu")


def _user_code(model: Any, guide: Any) -> bool:
    """Whether the pair runs code other than lvmkit's own models and guides, which make every
    tensor on their inputs' device (``tests/test_devices.py`` holds them to it): only such code
    needs torch's default device set, a mode that costs every torch call some host time (about
    60 % of an eager step of a tiny network on the CPU)."""
    return not all(
        isinstance(obj, nn.Module) and type(obj).__module__.startswith("lvmkit.")
        for obj in (model, guide)
    )


def _parameters(model: Any, guide: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The pair's parameters it holds now: its modules' (parameters and buffers), else the param
    store's (plain-function pairs keep theirs there)."""
    for role, obj in (("model", model), ("guide", guide)):
        if isinstance(obj, nn.Module):
            for name, module in obj.named_modules(prefix=role):
                for key, tensor in [
                    *module.named_parameters(recurse=False),
                    *module.named_buffers(recurse=False),
                ]:
                    yield f"{name}.{key}", tensor
    if not (isinstance(model, nn.Module) and isinstance(guide, nn.Module)):
        for name, value in pyro.get_param_store().named_parameters():
            yield f"pyro.param {name!r}", value


def move_pair(placement: Placement, model: Any, guide: Any) -> None:
    """Move the pair's modules and the param store's tensors to the device, in place."""
    dev = placement.device
    for role, obj in (("model", model), ("guide", guide)):
        if isinstance(obj, nn.Module) and _off(obj, dev):
            obj.to(dev)
            placement.note("the pair's modules", role)
    for name, value in pyro.get_param_store().named_parameters():
        if value.device != dev:
            _move_tensor(value, dev)
            placement.note("pyro.param tensors", name)


def _off(module: nn.Module, dev: torch.device, recurse: bool = True) -> bool:
    tensors = [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
    return any(t.device != dev for t in tensors)


def _move_tensor(tensor: torch.Tensor, dev: torch.device) -> None:
    """In place, so that every holder of this tensor (a network, the param store) sees it moved."""
    with torch.no_grad():
        tensor.data = tensor.data.to(dev)
        if tensor.grad is not None:
            tensor.grad = tensor.grad.to(dev)


class _Mover(Messenger):
    """Moves each ``pyro.param`` tensor to the device as it is used: the store's entry, or the
    initial tensor (``pyro.module`` passes its network's own parameters)."""

    def __init__(self, placement: Placement) -> None:
        super().__init__()
        self.placement = placement

    def _pyro_param(self, msg: Any) -> None:
        args = msg["args"]
        dev = self.placement.device
        if len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].device != dev:
            if args[1].is_leaf:
                _move_tensor(args[1], dev)
            else:
                msg["args"] = (args[0], args[1].to(dev), *args[2:])
            self.placement.note("pyro.param tensors", str(args[0]))


@contextmanager
def _moving_modules(placement: Placement) -> Iterator[None]:
    """Every module whose forward runs in the block is moved to the device first (with its
    buffers: a BatchNorm's running statistics)."""
    dev = placement.device

    def move(module: nn.Module, *_: Any) -> None:
        if _off(module, dev, recurse=False):
            module.to(dev)
            placement.note("networks", type(module).__name__)

    handle = register_module_forward_pre_hook(move)
    try:
        yield
    finally:
        handle.remove()


# -- a mismatch inside the user's code ----------------------------------------------------------

_MISMATCH = (
    "Expected all tensors to be on the same device",
    "is not on the expected device",
    "Expected object of device type",
    "should be the same device",
    "must be on the same device",
    "on different devices",
)


def is_mismatch(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _MISMATCH)


class SiteTracker(Messenger):
    """Remembers the last sample or param site the pair reached (where a failure happened)."""

    def __init__(self) -> None:
        super().__init__()
        self.last: str | None = None

    def _pyro_sample(self, msg: Any) -> None:
        self.last = f"sample site {msg['name']!r}"

    def _pyro_param(self, msg: Any) -> None:
        self.last = f"param site {msg['args'][0]!r}"


def user_frame(err: BaseException) -> str | None:
    """The innermost frame of the traceback outside torch, Pyro, installed packages and the
    standard library: the model's or guide's own code, where a failure happened."""
    ours = [os.path.dirname(mod.__file__ or "") for mod in (torch, pyro)]
    ours.append(sysconfig.get_paths()["stdlib"])
    frames = traceback.extract_tb(err.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if "site-packages" not in path and not any(path.startswith(p + os.sep) for p in ours):
            return f"{frame.name}() at {frame.filename}:{frame.lineno}"
    return None


def explain_mismatch(
    err: BaseException, placement: Placement | None, site: str | None, who: str = "fit"
) -> str:
    """What a device mismatch raised inside the user's code means, where, and the fix."""
    where = user_frame(err)
    at = " in " + where if where else ""
    after = f" (at or after {site})" if site else ""
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    dev = placement.device if placement is not None else None
    if placement is not None and placement.moves:
        fix = (
            f"{who} moved the data, the pair's modules and the networks it saw to {dev}; a "
            "tensor or network the code holds from outside (made before the call, not a module "
            f"of the pair nor registered with pyro.module/pyro.param) stayed behind: make it "
            "inside the model or guide, register it, or move it to "
            f"{dev} yourself"
        )
    else:
        on = f" on {dev}" if dev is not None else ""
        fix = (
            f"{who} moves nothing unless asked (as Pyro's SVI), and runs{on}, where the data "
            "and parameters are: make tensors where the data are (x.new_zeros(k), "
            "torch.ones(k, device=x.device)), build or move networks there (net.to(x.device)), "
            f"or pass device={str(dev)!r} to {who}, which moves the data and the pair's "
            "networks there and runs the model, guide and transform with it as torch's "
            "default device"
        )
    return f"a device mismatch{at}{after}: {first}. {fix}"
