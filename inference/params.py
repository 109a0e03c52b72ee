"""Where the parameters of a model/guide pair live during ``fit`` and ``evaluate``.

Pyro registers every parameter a model touches in one global param store, so two models whose
parameters share a name (two ``VAE``s, say) would see each other's tensors. lvmkit runs each call
in a private param store:

- when model and guide are both ``nn.Module``s (PyroModules included), the private store starts
  empty and is dropped afterwards: the parameters live in the modules only;
- when either is a plain function (``pyro.module`` / ``pyro.param`` statements), the private store
  starts as a copy of the global one, as Pyro users expect — less the names the pair's own
  PyroModules hold, which keep their own values — and ``fit`` writes the trained entries back to
  the global store when it ends.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pyro
import torch
from pyro.nn import PyroModule
from pyro.params.param_store import module_from_param_with_module_name, user_param_name
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

if TYPE_CHECKING:  # pragma: no cover
    from lvmkit.inference.calls import Data


def is_module_pair(model: Any, guide: Any) -> bool:
    return isinstance(model, nn.Module) and isinstance(guide, nn.Module)


@contextmanager
def param_scope(model: Any, guide: Any, *, publish: bool) -> Iterator[None]:
    """Run the block in a private param store (see the module docstring)."""
    store = pyro.get_param_store()
    modules_only = is_module_pair(model, guide)
    owned = _owned_names(model, guide)
    start: Any = (
        {"params": {}, "constraints": {}} if modules_only else _without(store.get_state(), owned)
    )
    inner: Any = None
    with store.scope(state=start):
        try:
            yield
        finally:
            inner = store.get_state()
    if publish and not modules_only and inner is not None:
        # the plain-function entries go back to the global store; the PyroModules' own stay theirs
        merged = store.get_state()
        trained = _without(inner, owned)
        merged["params"].update(trained["params"])
        merged["constraints"].update(trained["constraints"])
        store.set_state(merged)


def _owned_names(model: Any, guide: Any) -> set[str]:
    """Names under which the pair's PyroModules keep parameters in the store. A PyroModule reads
    its parameters from the store by name, so another model's same-named entry (a second
    mixture's ``"locs"``, say) would silently replace its own values: such entries are kept out
    of the private store, and the modules' own are never published."""
    owned: set[str] = set()
    for obj in (model, guide):
        if isinstance(obj, PyroModule):
            owned.update(name for name, _ in obj.named_pyro_params())
    return owned


def _without(state: Any, owned: set[str]) -> Any:
    keep = [name for name in state["params"] if name.replace("$$$", ".") not in owned]
    return {
        "params": {name: state["params"][name] for name in keep},
        "constraints": {name: state["constraints"][name] for name in keep},
    }


def collect_params(
    step: Callable[[list[Data]], Any],
    calls: list[Data],
    model: Any,
    guide: Any,
) -> dict[str, torch.Tensor]:
    """Every trainable tensor: module parameters, then the ``pyro.param`` sites ``step`` touches.

    Running one step on ``calls`` also creates parameters that are initialised lazily, and it runs
    with Pyro's validation on, so model errors surface here with Pyro's own messages (with an
    explicit device, the caller runs it under ``Placement.first_use``, which moves each network
    and ``pyro.param`` tensor to the device as it is met).

    A ``pyro.module`` whose name is already taken in the param store gets the stored tensors back
    and computes with its own (Pyro's semantics). Two cases: a name the store held *before* the
    step — another network's, left from an earlier run — is refused (or warned about, when the
    shapes agree): Pyro would train that stale copy and the loss would not move. A name first
    registered *in* the step — model and guide holding networks of one name, as Pyro's CEVAE
    does — is trained as Pyro trains it: the first network's parameters are the store's and are
    trained, the second's keep their values (they are left out here), with one warning.
    """
    params: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, obj in (("model", model), ("guide", guide)):
        if isinstance(obj, nn.Module):
            for name, param in obj.named_parameters(prefix=prefix):
                if param.requires_grad and id(param) not in seen:
                    params[name] = param
                    seen.add(id(param))
    before = set(pyro.get_param_store().keys())
    with ParamLog() as log, pyro.validation_enabled(True):
        step(calls)
    shadowed: dict[str, nn.Parameter] = {}
    last: dict[str, torch.Tensor] = {}  # each name's value at its last call (a lazily set-up
    for name, own, value in log.sites:  # guide's first call may return a value it then replaces)
        if own is not None and own is not value:
            if name in before:
                _refuse_stale(name, own, value)
            else:
                shadowed[name] = own
        last[name] = value
    for name, value in last.items():
        unconstrained = value.unconstrained() if hasattr(value, "unconstrained") else value
        if not unconstrained.requires_grad or id(unconstrained) in seen:
            continue
        params[name] = unconstrained
        seen.add(id(unconstrained))
    if shadowed:
        _warn_shared_names(shadowed, model)
        dropped = {id(p) for p in shadowed.values()}
        params = {name: p for name, p in params.items() if id(p) not in dropped}
    if not params:
        raise ValueError(
            "model and guide have no trainable parameters: "
            "use PyroModules, pyro.module or pyro.param"
        )
    return params


class ParamLog(Messenger):
    """Every ``pyro.param`` call of a block, in order: (name, the ``nn.Parameter`` a
    ``pyro.module`` passed in or None, the tensor the store gave back). A trace keeps only the
    last call of each name; a name's first and later registrants both matter here."""

    def __enter__(self) -> ParamLog:
        self.sites: list[tuple[str, nn.Parameter | None, torch.Tensor]] = []
        return super().__enter__()

    def _pyro_post_param(self, msg: Any) -> None:
        args: tuple[Any, ...] = tuple(msg.get("args") or ())
        own = args[1] if len(args) >= 2 and isinstance(args[1], nn.Parameter) else None
        self.sites.append((msg["name"], own, msg["value"]))


def _refuse_stale(name: str, own: torch.Tensor, stored: torch.Tensor) -> None:
    """``pyro.module(m, net)`` passes each of ``net``'s parameters to ``pyro.param``; the store,
    holding another network's tensor under that name from before this run, returns that one."""
    module = module_from_param_with_module_name(name) or name
    what = f"{user_param_name(name)!r} of pyro.module({module!r}, ...)"
    fix = (
        "Call pyro.clear_param_store() before building a new network (as Pyro's examples do), "
        "or register it under another name"
    )
    if tuple(own.shape) != tuple(stored.shape):
        raise ValueError(
            f"Pyro's param store already holds {name!r} with shape {tuple(stored.shape)} from "
            f"another network, but {what} has shape {tuple(own.shape)}: Pyro would train the "
            f"stored tensor while the network computes with its own. {fix}"
        )
    warnings.warn(
        f"Pyro's param store already holds {name!r} from another network of the same shape: "
        f"Pyro trains that stored tensor, while {what} computes with its own parameters (unless "
        f"registered with update_module_params=True), so the loss may not move. {fix}",
        RuntimeWarning,
        stacklevel=5,
    )


def _warn_shared_names(shadowed: dict[str, nn.Parameter], model: Any) -> None:
    modules = sorted({module_from_param_with_module_name(name) or name for name in shadowed})
    in_model = isinstance(model, nn.Module) and any(
        p is own for p in model.parameters() for own in shadowed.values()
    )
    who = "the model and the guide both register a network" if in_model else "two networks register"
    names = ", ".join(repr(m) for m in modules)
    warnings.warn(
        f"{who} under the name(s) {names} (pyro.module, or a PyroModule attribute). As "
        "in Pyro, the parameters first registered under a name in a step (the guide's: it runs "
        "first) are the ones stored and trained; the network registered second computes with its "
        "own parameters, which keep their initial values. Give the networks distinct names to "
        "train both.",
        RuntimeWarning,
        stacklevel=5,
    )


@contextmanager
def eval_mode(*objects: Any) -> Iterator[None]:
    """Modules in eval mode for the block (no dropout, BatchNorm's running statistics, no
    training-only corruption or penalties), each given back its own mode afterwards.

    The modules among ``objects`` are switched at once; so is every other module whose
    forward runs inside the block — the networks a plain-function pair registers with
    ``pyro.module`` — through a forward pre-hook, before their first forward computes anything.
    """
    modes: dict[nn.Module, bool] = {}

    def to_eval(module: nn.Module, *_: Any) -> None:
        if module not in modes:
            modes[module] = module.training
        module.training = False

    for obj in objects:
        if isinstance(obj, nn.Module):
            for module in obj.modules():
                to_eval(module)
    handle = register_module_forward_pre_hook(to_eval)
    try:
        yield
    finally:
        handle.remove()
        for module, training in modes.items():
            module.training = training
