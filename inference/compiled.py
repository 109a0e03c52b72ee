"""The compiled step: loss, gradients, clipping and the optimizer's update as one compiled function.

Pyro's per-step work — effect handlers, trace bookkeeping, distribution objects — is Python that
runs every step, and an eager step then runs its backward pass and the optimizer op by op. NumPyro
avoids both by running the whole of ``SVI.update`` as one jitted program. This module does the
same on torch, for any model/guide pair whose step is a fixed tensor program per batch shape:

1. **Capture** (:func:`capture`). One evaluation of the objective's loss on a minibatch is
   recorded as an FX graph with ``torch.fx.experimental.proxy_tensor.make_fx`` (tracing mode
   "real"), the trained parameters and the minibatch's tensors as the graph's inputs, the random
   draws as nodes in it. Pyro's own host syncs in its ELBOs (``torch_item``, ``warn_if_nan``) are
   switched off for the capture only: lvmkit checks for non-finite values at its check points. A
   pair whose Python reads a tensor's value (``if x.sum() > 0``, ``int(lengths.max())``) cannot be
   captured (make_fx refuses it); a graph whose shapes follow the data's values (a boolean mask's
   selection) or that writes in place to a tensor it does not own (an input, or a buffer such as
   BatchNorm's running statistics) is refused.
2. **Check**. The graph's loss and gradients must equal the eager loss's on the same minibatch
   and random draws (relative 1e-4 on the loss; 1e-3 on gradients, elements within 1e-4 of
   their tensor's largest besides), or the pair trains eagerly.
   Parameters the eager loss leaves without a gradient get none here either (and no update).
3. **Compile**. ``torch.func.grad_and_value`` over the graph, the gradient-norm clipping and the
   optimizer's update (:mod:`lvmkit.inference.updates`: Adam, AdamW, SGD, Pyro's ClippedAdam, on
   the optimizer's own state tensors, each group's learning rate an input) are one function,
   compiled by ``torch.compile(fullgraph=True, dynamic=False)`` with inductor; on CUDA with
   ``mode="reduce-overhead"``, so that a step replays as one CUDA graph. Random numbers are
   torch's own (inductor's ``fallback_random``): a compiled step draws exactly what the eager step
   draws from the same random state, so the two differ only in the last bits of fused
   arithmetic, and a resumed compiled run replays an uninterrupted one bit for bit. Any other
   optimizer (or Pyro's per-parameter ``clip_args``) gets a compiled loss and gradient and steps
   eagerly. On AMD CPUs the graph's large float32 products are oneDNN's, not MKL's
   (:mod:`lvmkit.inference.products`). Inductor keeps what it compiled in its on-disk cache
   (``TORCHINDUCTOR_CACHE_DIR``, by default under the system's temporary folder), so a second
   run of the same pair and shapes compiles in seconds.

One graph per call structure and batch shape: under ``compile=None`` (fit's default on a long
run) an epoch's last, smaller minibatch takes the eager step instead (a second compilation for
one step an epoch does not repay itself); ``compile=True`` compiles each shape. Anything that
fails — capture, check, compilation — makes the pair train eagerly, said in one log line
(``compile=None``) or a warning (``compile=True``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import traceback
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from lvmkit.inference import products, updates
from lvmkit.inference.calls import Data
from lvmkit.inference.params import ParamLog

_log = logging.getLogger("lvmkit")
# torch.compile's backend for the step: inductor (C++ kernels on the CPU, Triton kernels and a CUDA
# graph on a GPU). "aot_eager" runs the same graph through dynamo and AOTAutograd without code
# generation (the test suite uses it where compilation itself is not what a test is about).
BACKEND = "inductor"
# parameters × points of a step below which the host bounds it (the 16-8-2 VAE at batch 8:
# 3,000; the 784-400-20 VAE at batch 128: 81 million)
HOST_BOUND_WORK = 1_000_000
_HERE = os.path.dirname(__file__)  # lvmkit's inference code: not where a pair's problem is


class CompiledStep:
    """A training step compiled per call shape (see the module docstring).

    ``loss`` computes the objective's loss eagerly on a :class:`~lvmkit.inference.calls.Data`;
    ``params`` are the trained tensors (module parameters and ``pyro.param`` sites, by name);
    ``optim`` the :class:`~lvmkit.inference.optim.Optim` that owns the optimizer and its state.
    Calling it on a minibatch takes one whole step and returns the loss as a device tensor, or
    returns None where the caller must take the eager step instead (compilation off, failed, or
    not worth it for this shape). ``auto=True`` is ``fit``'s ``compile=None``: failures are one
    log line, and a minibatch smaller than the first is left to the eager step. ``setup_s`` is
    the time capture, check and compilation took.
    """

    def __init__(
        self,
        loss: Callable[[Data], torch.Tensor],
        params: dict[str, torch.Tensor],
        optim: Any,
        *,
        auto: bool = False,
    ) -> None:
        self.loss, self.params, self.optim = loss, params, optim
        self.auto, self.enabled = auto, True
        self.failure: str | None = None
        self.setup_s = 0.0
        self._by_shape: dict[tuple[Any, ...], _Compiled] = {}
        self._points: dict[tuple[Any, ...], int] = {}

    @property
    def active(self) -> bool:
        """Whether steps may run compiled (none failed, and compilation is on)."""
        return self.enabled and self.failure is None

    @property
    def ran(self) -> bool:
        """Whether steps ran compiled (a graph was compiled, and none failed since)."""
        return self.active and bool(self._by_shape)

    def __call__(self, call: Data) -> torch.Tensor | None:
        if not self.active:
            return None
        values, shape, why = _call_shape(call)
        if why is not None:
            self._give_up(why)
            return None
        keys = shape[0]
        compiled = self._by_shape.get(shape)
        if compiled is None:
            points = call.num_points or 0
            first = self._points.setdefault(keys, points)
            if self.auto and points < first:  # an epoch's last, smaller minibatch
                return None
            tic = time.perf_counter()
            try:
                compiled = self._build(call, values)
            finally:
                self.setup_s += time.perf_counter() - tic
            if compiled is None:
                return None
            self._by_shape[shape] = compiled
            tic = time.perf_counter()
            try:  # the first call compiles (and takes the step)
                with _inductor_jit_quiet():
                    return compiled.step(values, self.optim)
            except Exception as err:  # inductor or the C++ compiler failing: eager from here
                self._give_up(f"compilation failed: {_why(err)}")
                return None
            finally:
                self.setup_s += time.perf_counter() - tic
        return compiled.step(values, self.optim)

    def _give_up(self, why: str) -> None:
        self.failure = why
        _say_eager(
            self.auto,
            f"lvmkit: fit runs this model/guide's steps eagerly, uncompiled ({why})",
            f"compile=True: this model/guide's step could not be compiled ({why}); training "
            "continues eagerly. Compiling needs a step that is the same tensor program every "
            "time: the same sample sites and shapes, no Python decisions on tensor values, "
            "tensors as arguments.",
            stacklevel=6,  # (fit's caller)
        )

    def _build(self, call: Data, values: list[torch.Tensor]) -> _Compiled | None:
        names = list(self.params)
        params = [self.params[n] for n in names]
        graph, why = capture(self.loss, call, params)
        if graph is None:
            self._give_up(str(why))
            return None
        unused, differs = _check(graph, self.loss, call, params, values, names)
        if differs is not None:
            self._give_up(f"the captured loss differs from the eager one: {differs}")
            return None
        used = [i for i in range(len(params)) if i not in unused]
        plan = None
        if self.optim.before_step is None and not self.optim.per_param_clip:
            plan = updates.plan(self.optim.optimizer)
        work = sum(p.numel() for p in params) * max(1, call.num_points or 1)
        number = len(self._by_shape) + 1  # (names its code object)
        return _Compiled(graph, params, used, plan, self.optim.clip_norm, number, work)


class CompiledPass:
    """The evaluation kernel's pass compiled per chunk shape, as the training step is.

    ``run(call, samples)`` is one eager pass: the ``(samples, n)`` log-weights of a chunk's
    points (:meth:`lvmkit.inference.weights.WeightStream`); ``static`` the tensors it reads that
    are not ``pyro.param`` sites (a module pair's parameters and buffers). The first chunk of
    each shape runs eagerly while the pass is captured (:func:`capture`: the parameters the pass
    reads — logged as it reads them — and the chunk's tensors as inputs, the draws as nodes),
    checked against it from the same random state (relative 1e-4), and compiled with torch's own
    random numbers: a compiled pass draws what the eager pass would have, so the two differ in
    the last bits of fused arithmetic only, and the caller's random stream advances alike.
    ``auto`` (``evaluate(compile=None)``): a failure is one log line, a shape other than the
    first (an evaluation's last, smaller chunk) runs eagerly, and ``worth(params)`` (the tensors
    the pass reads) may decide on the first chunk that compiling would not repay itself.
    Anything that fails makes the rest of the evaluation eager. ``setup_s``: what capture,
    check and compilation took.
    """

    def __init__(
        self,
        run: Callable[[Data, int], torch.Tensor],
        static: list[torch.Tensor],
        *,
        auto: bool = False,
        worth: Callable[[list[torch.Tensor]], bool] | None = None,
    ) -> None:
        self.run, self.static, self.auto, self.worth = run, static, auto, worth
        self.failure: str | None = None
        self.setup_s = 0.0
        self._params: list[torch.Tensor] = []
        self._by_shape: dict[tuple[Any, ...], Callable[..., torch.Tensor]] = {}

    @property
    def ran(self) -> bool:
        """Whether passes ran compiled (a shape was compiled, and nothing failed since)."""
        return self.failure is None and bool(self._by_shape)

    def __call__(self, call: Data, samples: int) -> torch.Tensor:
        if self.failure is not None:
            return self.run(call, samples)
        values, shape, why = _call_shape(call)
        if why is not None:
            self._give_up(why)
            return self.run(call, samples)
        shape = (samples, *shape)
        compiled = self._by_shape.get(shape)
        if compiled is not None:
            return compiled(self._params, *values)
        if self.auto and self._by_shape:
            return self.run(call, samples)
        tic = time.perf_counter()
        try:
            return self._build(call, samples, values, shape)
        finally:
            self.setup_s += time.perf_counter() - tic

    def _build(
        self, call: Data, samples: int, values: list[torch.Tensor], shape: tuple[Any, ...]
    ) -> torch.Tensor:
        devices = sorted({t.device.index or 0 for t in [*values, *self.static] if t.is_cuda})
        start = _random_states(devices)
        with ParamLog() as log:
            eager = self.run(call, samples)  # the chunk's weights, as an eager pass draws them
        params = _unique([*self.static, *(_leaf(value) for _, _, value in log.sites)])
        if self.auto and self.worth is not None and not self.worth(params):
            self.failure = "the evaluation is too short to repay compiling its pass"
            return eager
        graph, why = capture(lambda c: self.run(c, samples), call, params)
        if graph is None:
            self._give_up(str(why))
            return eager
        number = len(self._by_shape) + 1
        compiled = torch.compile(
            _fresh(graph.forward, f"lvmkit_pass_{number}"), fullgraph=True, dynamic=False,
            **_compile_options(cuda=False, host_bound=False),
        )  # fmt: skip
        try:
            with _replaying(start, devices), _inductor_jit_quiet():
                again = compiled(params, *values)
        except Exception as err:  # inductor or the C++ compiler failing
            self._give_up(f"compilation failed: {_why(err)}")
            return eager
        if again.shape != eager.shape or not torch.allclose(again, eager, rtol=1e-4, atol=1e-4):
            worst = float((again - eager).abs().max()) if again.shape == eager.shape else math.nan
            self._give_up(f"the compiled log-weights differ from the eager ones by {worst:.3g}")
            return eager
        self._params = params
        self._by_shape[shape] = compiled
        return again  # (every pass compiled: a resumed evaluation gets the same bits)

    def _give_up(self, why: str) -> None:
        self.failure = why
        _say_eager(
            self.auto,
            f"lvmkit: evaluate runs this model/guide's passes eagerly ({why})",
            f"compile=True: the evaluation's pass could not be compiled ({why}); it continues "
            "eagerly",
            stacklevel=5,  # (evaluate's caller)
        )


def _call_shape(call: Data) -> tuple[list[torch.Tensor], tuple[Any, ...], str | None]:
    """A call's tensors and the key a compiled graph is kept under (its arguments' layout, each
    tensor's shape, dtype and device), or why it cannot have one."""
    values = call.values()
    if not all(isinstance(v, torch.Tensor) for v in values):
        kinds = sorted({type(v).__name__ for v in values if not isinstance(v, torch.Tensor)})
        return values, (), f"its arguments are not all tensors ({', '.join(kinds)})"
    keys = (len(call.args), tuple(call.kwargs))
    return values, (keys, *((tuple(t.shape), t.dtype, t.device) for t in values)), None


def _say_eager(auto: bool, line: str, warning: str, *, stacklevel: int) -> None:
    """Why compiling stopped: one log line under ``compile=None``, a warning under
    ``compile=True``."""
    if auto:
        _log.warning("%s", line)
        return
    warnings.warn(warning, RuntimeWarning, stacklevel=stacklevel)


@contextlib.contextmanager
def _inductor_jit_quiet() -> Iterator[None]:
    """Compiling: inductor's own use of TorchScript, which torch 2.13 marks deprecated, unsaid."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*torch\.jit.* is deprecated", DeprecationWarning)
        yield


def _leaf(value: torch.Tensor) -> torch.Tensor:
    """The tensor a ``pyro.param`` value is computed from (its unconstrained leaf)."""
    return value.unconstrained() if hasattr(value, "unconstrained") else value


def _unique(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor once (by identity), in order of first appearance."""
    return list({id(t): t for t in tensors}.values())


def _random_states(devices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cuda = [torch.cuda.get_rng_state(d) for d in devices]
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replaying(
    state: tuple[torch.Tensor, list[torch.Tensor]], devices: list[int]
) -> Iterator[None]:
    """Run the block from the random state ``state``, leaving the caller's as it was."""
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        for device, cuda in zip(devices, state[1], strict=True):
            torch.cuda.set_rng_state(cuda, device)
        yield


def _fresh(function: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``function`` with a code object of its own: dynamo caches compiled code per code object,
    and every fit (evaluation) makes new graphs — the same code would be recompiled, and past
    dynamo's limit, run eagerly."""
    code = function.__code__.replace(co_name=name)
    bound = getattr(function, "__self__", None)
    fresh = types.FunctionType(
        code, function.__globals__, name, function.__defaults__, function.__closure__
    )
    return fresh if bound is None else types.MethodType(fresh, bound)


def _compile_options(*, cuda: bool, host_bound: bool) -> dict[str, Any]:
    """``torch.compile``'s backend and options for lvmkit's graphs (see :data:`BACKEND`)."""
    if BACKEND != "inductor":
        return {"backend": BACKEND}
    options: dict[str, Any] = {
        "fallback_random": True,  # torch's own random numbers: the eager draws
        "size_asserts": False,  # (each input's sizes checked every call: ours are)
        # the per-call wrapper in C++, not Python: ~13 % off a step the host bounds, but ~8 s
        # more to compile cold, which a step of real arithmetic (the MNIST VAE's) does not repay
        "cpp_wrapper": host_bound,
    }
    if not cuda and not host_bound and products.wanted():  # (oneDNN's cost per call: not there)
        options["post_grad_custom_post_pass"] = products.PASS  # large products by oneDNN
    return {"mode": "reduce-overhead" if cuda else None, "options": options}


def capture(
    loss: Callable[[Data], torch.Tensor], call: Data, params: list[torch.Tensor]
) -> tuple[torch.fx.GraphModule | None, str | None]:
    """The FX graph of ``loss`` on ``call``: inputs ``(params, *call's tensors)``, output the
    loss. Draws nothing from the caller's random stream. ``(None, why)`` where it cannot be
    captured or must not be used."""
    num_args, names = len(call.args), tuple(call.kwargs)

    def flat(params: list[torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(names, tensors[num_args:], strict=True))
        return loss(call.with_arguments(tuple(tensors[:num_args]), kwargs))

    devices = [t.device.index or 0 for t in call.values() if t.is_cuda]
    try:
        with (
            torch.random.fork_rng(devices=devices),
            pyro.validation_enabled(False),  # its checks read values on the host
            _pyro_host_syncs_off(),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            graph = make_fx(flat, tracing_mode="real", decomposition_table=_DECOMPOSITIONS)(
                params, *call.values()
            )
    except Exception as err:
        return None, _why(err, user_frame=True)
    bad = _data_dependent_shape(graph) or _foreign_writes(graph)
    if bad is not None:
        return None, bad
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return graph, None


def _bce_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
    reduction: int = 1,
) -> Any:
    """The Bernoulli log-density with logits (Pyro's ``Bernoulli.log_prob`` is minus this,
    unreduced) as (1 − y)·l + softplus(−l): one ``exp`` and one ``log1p`` an element where
    inductor's decomposition of torch's op takes two ``exp``, a ``log`` and a division — half
    the time, forward and backward fused (323 → 186 µs on a 128 × 784 batch, one thread). The
    same values (its largest error against float64 equals torch's own on logits from −100 to 100)
    and exact gradients (softplus's own backward: sigmoid(l) − y, at l = 0 too). Weighted or
    reduced calls keep torch's decomposition."""
    if weight is not None or pos_weight is not None or reduction != 0:
        return NotImplemented
    return (1 - target) * input + torch.nn.functional.softplus(-input)


# what the capture records in place of an op (make_fx's decomposition table)
_DECOMPOSITIONS = {torch.ops.aten.binary_cross_entropy_with_logits.default: _bce_with_logits}


def _data_dependent_shape(graph: torch.fx.GraphModule) -> str | None:
    """Why the graph holds a shape that the data's values decide (a boolean mask's selection,
    ``nonzero``, ``unique``): the next minibatch's values would need another shape. Indexing
    with integer tensors (``locs[k]``) keeps its shape and is fine."""
    for node in graph.graph.nodes:
        tags = getattr(node.target, "tags", ())
        if node.op != "call_function" or torch.Tag.dynamic_output_shape not in tags:
            continue
        if node.target is torch.ops.aten.index.Tensor:
            indices = [i for i in node.args[1] if i is not None]
            kinds = [getattr(i.meta.get("val"), "dtype", None) for i in indices]
            if all(k is not None and not k.is_floating_point and k not in _MASKS for k in kinds):
                continue
        return (
            f"a shape in the loss depends on the data's values ({node.target}: a boolean mask's "
            "selection, nonzero or unique), which one graph cannot follow"
        )
    return None


_MASKS = (torch.bool, torch.uint8)


def _foreign_writes(graph: torch.fx.GraphModule) -> str | None:
    """Why the graph must not be replayed: it writes in place to one of its inputs or to a
    tensor it captured from outside (a buffer: BatchNorm's running statistics, an EMA codebook),
    which a replay would not keep up to date. None when it writes only to its own tensors."""
    outside = {n for n in graph.graph.nodes if n.op in ("placeholder", "get_attr")}
    for node in graph.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        for argument, value in zip(schema.arguments, node.args, strict=False):
            alias = argument.alias_info
            if alias is not None and alias.is_write and value in outside:
                what = "a parameter or input" if value.op == "placeholder" else "a buffer"
                return f"the loss writes in place to {what} ({node.target})"
    return None


def _check(
    graph: torch.fx.GraphModule,
    loss: Callable[[Data], torch.Tensor],
    call: Data,
    params: list[torch.Tensor],
    values: list[torch.Tensor],
    names: list[str],
) -> tuple[set[int], str | None]:
    """Run the graph and the eager loss from the same random state on this minibatch: the
    parameters without an eager gradient, and how the two differ (None: they agree)."""
    devices = [t.device.index or 0 for t in values if t.is_cuda]
    results = []
    for run in (lambda: graph(params, *values), lambda: loss(call)):
        with torch.random.fork_rng(devices=devices), pyro.validation_enabled(False):
            torch.manual_seed(0)  # the same draws for both (the caller's stream untouched)
            try:
                value = run()
                grads = torch.autograd.grad(value, params, allow_unused=True)
            except Exception as err:
                return set(), _why(err)
        results.append((value.detach(), grads))
    (captured, captured_grads), (eager, eager_grads) = results
    unused = {i for i, g in enumerate(eager_grads) if g is None}
    if not torch.allclose(captured, eager, rtol=1e-4, atol=1e-5):
        return unused, f"loss {float(captured):.6g} captured, {float(eager):.6g} eager"
    for i, (a, b) in enumerate(zip(captured_grads, eager_grads, strict=True)):
        if b is None:
            continue
        # (the absolute part scaled to the gradient's largest element: where terms cancel, as
        # in an importance-weighted bound's, float32's rounding alone moves the smallest
        # elements by more than 1e-3 of themselves — eager float32 against float64 too)
        atol = 1e-5 + 1e-4 * float(b.abs().max())
        if a is None or not torch.allclose(a, b, rtol=1e-3, atol=atol):
            return unused, f"the gradient of {names[i]!r}"
    return unused, None


class _Compiled:
    """One call shape's compiled step: the captured graph's gradients, clipping and the update
    (or the gradients alone, where the optimizer has no update written on tensors)."""

    def __init__(
        self,
        graph: torch.fx.GraphModule,
        params: list[torch.Tensor],
        used: list[int],
        plan: updates.Plan | None,
        clip_norm: float | None,
        number: int,
        work: int,
    ) -> None:
        unused = [i for i in range(len(params)) if i not in set(used)]
        self.trained = [params[i] for i in used]
        self.others = [params[i] for i in unused]
        self.plan = plan
        self._state: tuple[int, list[Any]] | None = None  # (optimizer state version, tensors)
        self._lrs: list[tuple[float, torch.Tensor]] = []
        order = used + unused
        position = [order.index(i) for i in range(len(params))]  # where each input comes from
        rules = plan.rules if plan is not None else ()
        clip = clip_norm if plan is not None else None  # else the eager step clips
        groups: list[int] = []

        def step(trained, others, states, lrs, *tensors):
            def loss_of(trained):
                both = [*trained, *others]
                return graph([both[j] for j in position], *tensors)

            grads, loss = torch.func.grad_and_value(loss_of)(trained)
            if rules:
                if clip is not None:
                    grads = _clipped(grads, clip)
                updates.apply(rules, groups, trained, grads, states, lrs)
                return loss.detach(), ()
            return loss.detach(), grads

        self.groups = groups  # filled on the first call (needs the optimizer)
        cuda = any(p.is_cuda for p in params)
        if cuda:
            for tensor in params:
                _mark_static(tensor)
        self.function = torch.compile(
            _fresh(step, f"lvmkit_step_{number}"), fullgraph=True, dynamic=False,
            **_compile_options(cuda=cuda, host_bound=work < HOST_BOUND_WORK),
        )  # fmt: skip
        self.cuda = cuda
        self.warm = False

    def step(self, values: list[torch.Tensor], optim: Any) -> torch.Tensor:
        optimizer = optim.optimizer
        if self.plan is None:
            optim.zero_grad()
            loss, grads = self.function(self.trained, self.others, [], [], *values)
            for param, grad in zip(self.trained, grads, strict=True):
                param.grad = grad
            optim.step()
            return loss
        if not self.groups:
            self.groups.extend(self.plan.groups(optimizer, self.trained))
        host = self.plan.on_host
        if host:
            self.plan.before(optimizer)
        states = self._states(optim)
        rates = self._rates(optimizer)
        if self.warm:
            # dynamo's guards would check every input of every call; this function has one
            # compiled entry, for inputs whose shapes, dtypes and devices CompiledStep keys it by
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                loss, _ = self.function(self.trained, self.others, states, rates, *values)
        else:
            loss, _ = self.function(self.trained, self.others, states, rates, *values)
            self.warm = True
        if host:
            self.plan.after(optimizer, self.trained)
        optim.stepped()
        return loss

    def _states(self, optim: Any) -> list[Any]:
        """The optimizer's state tensors (gathered again after ``load_state_dict``)."""
        if self._state is None or self._state[0] != optim.version:
            assert self.plan is not None
            states = self.plan.state(optim.optimizer, self.trained)
            if self.cuda:
                for state in states:
                    for tensor in state:
                        _mark_static(tensor)
            self._state = (optim.version, states)
        return self._state[1]

    def _rates(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """Each group's learning rate as a tensor on the parameters' device, refilled in place
        when a schedule changes it (a CUDA graph reads it from the same address)."""
        groups = optimizer.param_groups
        if len(self._lrs) != len(groups):
            device = self.trained[0].device
            self._lrs = []
            for group in groups:
                rate = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
                if self.cuda:
                    _mark_static(rate)
                self._lrs.append((float(group["lr"]), rate))
        out = []
        for i, group in enumerate(groups):
            value, rate = self._lrs[i]
            if group["lr"] != value:
                rate.fill_(float(group["lr"]))
                self._lrs[i] = (float(group["lr"]), rate)
            out.append(rate)
        return out


def _clipped(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """``torch.nn.utils.clip_grad_norm_``'s arithmetic: the gradients scaled so that their
    joint 2-norm is at most ``max_norm``."""
    norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
    total = torch.linalg.vector_norm(norms)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return [g * coef for g in grads]


def _mark_static(tensor: torch.Tensor) -> None:
    """Tell dynamo a tensor keeps its address between steps (a parameter, optimizer state, the
    learning rate), so a CUDA graph may read and write it in place."""
    torch._dynamo.mark_static_address(tensor)


@contextlib.contextmanager
def _pyro_host_syncs_off() -> Iterator[None]:
    """Pyro's ELBOs with ``torch_item`` keeping the value on the device (the same number, and
    the same gradient where it is subtracted to leave the surrogate's) and ``warn_if_nan``
    silent, for the duration of a capture: both read a value on the host, which a captured graph
    cannot do. The names are patched wherever a module imported them — Pyro's objectives, and
    the ELBOs written on them (Pyro's contributed ``TraceCausalEffect_ELBO``, a user's own) —
    found by identity in each loaded module's namespace (no attribute lookups: lazy modules are
    not woken)."""
    from pyro.infer.util import torch_item
    from pyro.util import warn_if_nan

    stand_ins = {id(torch_item): _on_device, id(warn_if_nan): _silent}
    patched: list[tuple[dict[str, Any], str, Any]] = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attr in ("torch_item", "warn_if_nan"):
            original = namespace.get(attr)
            if original is not None and id(original) in stand_ins:
                patched.append((namespace, attr, original))
                namespace[attr] = stand_ins[id(original)]
    try:
        yield
    finally:
        for namespace, attr, original in patched:
            namespace[attr] = original


def _on_device(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _silent(value: Any, *args: Any, **kwargs: Any) -> Any:
    return value


def _why(err: BaseException, *, user_frame: bool = False) -> str:
    text = str(err).splitlines()[0][:300] if str(err) else ""
    if "_local_scalar_dense" not in text and "data-dependent" not in text:
        return f"{type(err).__name__}: {text}"
    text = "the pair reads a tensor's value in Python (data-dependent control flow)"
    if not user_frame:
        return text
    stdlib = os.path.dirname(os.__file__)
    frames = [
        f
        for f in traceback.extract_tb(err.__traceback__)
        if not f.filename.startswith((os.path.dirname(torch.__file__), _HERE, stdlib))
    ]
    if not frames:
        return text
    last = frames[-1]
    where = f"{os.path.basename(last.filename)}:{last.lineno}"
    if last.filename.startswith(os.path.dirname(pyro.__file__)):  # Pyro's own code reads it
        return (
            f"Pyro's {last.name} ({where}) reads a tensor's value in Python; lvmkit's own "
            "objectives (objective='elbo', 'iwae', 'rws') keep such sums on the device"
        )
    return f"{text} ({where})"
