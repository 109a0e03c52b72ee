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
import pyro.poutine as poutine
import torch
from pyro.nn import PyroModule
from pyro.params.param_store import module_from_param_with_module_name, user_param_name
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
    and ``pyro.param`` tensor to the device as it is met). A
    ``pyro.module`` whose name already holds another network's parameters in the param store is
    refused (or warned about, when the shapes agree): Pyro would train the store's copy while the
    network computes with its own, and the loss would not move.
    """
    params: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, obj in (("model", model), ("guide", guide)):
        if isinstance(obj, nn.Module):
            for name, param in obj.named_parameters(prefix=prefix):
                if param.requires_grad and id(param) not in seen:
                    params[name] = param
                    seen.add(id(param))
    with poutine.trace(param_only=True) as capture, pyro.validation_enabled(True):
        step(calls)
    for name, site in capture.trace.nodes.items():
        value: Any = site["value"]
        _check_not_stale(name, site)
        unconstrained = value.unconstrained() if hasattr(value, "unconstrained") else value
        if not unconstrained.requires_grad or id(unconstrained) in seen:
            continue
        params[name] = unconstrained
        seen.add(id(unconstrained))
    if not params:
        raise ValueError(
            "model and guide have no trainable parameters: "
            "use PyroModules, pyro.module or pyro.param"
        )
    return params


def _check_not_stale(name: str, site: Any) -> None:
    """``pyro.module(m, net)`` passes each of ``net``'s parameters to ``pyro.param``; when the
    store already holds another tensor under that name, it returns that one instead."""
    args: tuple[Any, ...] = tuple(site.get("args") or ())
    if len(args) < 2 or not isinstance(args[1], nn.Parameter) or args[1] is site["value"]:
        return
    own, stored = args[1], site["value"]
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
        stacklevel=4,
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
