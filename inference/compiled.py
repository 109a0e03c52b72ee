"""``fit(..., compile=True)``: the Trace_ELBO loss traced once per batch shape with the PyTorch JIT.

Pyro's per-step work — effect handlers, trace bookkeeping, distribution objects — is Python that
runs every step. Tracing the loss with ``torch.jit.trace`` (through Pyro's ``pyro.ops.jit.trace``,
which plumbs parameters by name) records the tensor operations once and replays them, which is
valid for models whose structure does not change between steps (no data-dependent control flow,
no new sample sites). On the 2-core CPU this brings the MNIST VAE step within ~1.05× of a
hand-written PyTorch loop (see ``lvmkit bench speed``).

Three things Pyro's own ``JitTrace_ELBO`` does not do, and this module does:

- one traced graph per batch shape: Pyro keys its cache by argument count, so the last, smaller
  minibatch of an epoch would replay a graph traced for the full batch size;
- tensors always reach the traced function positionally (tensor keyword arguments would be hashed
  by identity, recompiling every step);
- no NaN check on the host per step, and compilation runs under ``torch.random.fork_rng`` so that
  it draws nothing from the random stream: resumed runs stay identical to uninterrupted ones;
- each traced graph is specialised to its batch shape and then called directly. The input sizes
  become constants and TorchScript's own passes fold everything computed from them and from
  constants alone (the plates' index ranges and scale factors, the prior's expanded parameters,
  no-op expands and broadcasts; the 784-400-20 VAE's graph goes from 240 nodes to 78), and each
  step hands the parameters to the graph straight from the param store instead of through Pyro's
  ``pyro.ops.jit`` wrapper (a ``pyro.param`` effect per parameter, two effect handlers and a
  hash of the arguments per call). The graph runs without the JIT's profiling optimisations
  (``torch.jit.optimized_execution(False)``): they measured no faster here, and their symbolic
  gradients, switched on after a few profiling runs, differ in the last bit from autograd's,
  which would make a resumed run drift from an uninterrupted one. Measured on the 2-core CPU
  (interleaved, hand-written PyTorch = 1): 784-400-20 VAE at batch 128, 1.12–1.15× → 1.03–1.05×;
  a 784-32-4 VAE at batch 32, 1.15× → 1.04×.

Models that cannot be traced fall back to the uncompiled loss with a warning that says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pyro
import pyro.infer
import torch

from lvmkit.inference.calls import Data


class _JitTraceELBO(pyro.infer.JitTrace_ELBO):
    """Pyro's JitTrace_ELBO without the per-step host-side NaN check, and with the gradient of
    the surrogate loss only: Pyro 1.9's ``differentiable_loss`` adds the surrogate's gradient to
    the loss's own (its ``loss`` is not detached), which doubles the gradient of every
    reparameterised term — invisible under Adam, which ignores a constant scale, but not under
    SGD, gradient clipping or weight decay (Pyro's own ``loss_and_grads`` is right)."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss, surrogate = self.loss_and_surrogate_loss(model, guide, *args, **kwargs)
        return _value_with_surrogate_gradient(loss, surrogate)


class CompiledLoss:
    """The Trace_ELBO loss of ``model``/``guide`` on a call, traced once per argument shape.

    ``fallback`` computes the same loss uncompiled (on a :class:`~lvmkit.inference.calls.Data`);
    it is used from the first failure on — a model that cannot be traced, a call with arguments
    that are not tensors, or a traced graph that fails when replayed on a later minibatch (a
    structure that depends on the data's values: a loop over ``int(lengths.max())`` steps,
    say) — with a warning that says why.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        guide: Callable[..., Any],
        fallback: Callable[[Data], torch.Tensor],
    ) -> None:
        self.fallback = fallback
        self.failure: str | None = None
        self._by_shape: dict[tuple[Any, ...], Callable[[list[torch.Tensor]], torch.Tensor]] = {}
        self._model, self._guide = model, guide

    def __call__(self, call: Data) -> torch.Tensor:
        if self.failure is not None:
            return self.fallback(call)
        values = call.values()
        if not all(isinstance(v, torch.Tensor) for v in values):
            kinds = sorted({type(v).__name__ for v in values if not isinstance(v, torch.Tensor)})
            self._give_up(f"its arguments are not all tensors ({', '.join(kinds)})")
            return self.fallback(call)
        keys = (len(call.args), tuple(call.kwargs))
        shape = (keys, *((tuple(t.shape), t.dtype, t.device) for t in values))
        loss = self._by_shape.get(shape)
        if loss is None:
            loss = self._compile(shape, keys, values)
            if loss is None:
                return self.fallback(call)
        try:
            return loss(values)
        except Exception as err:  # a graph traced on one minibatch that does not fit another
            self._give_up(_why(err) + " when replaying the traced graph")
            return self.fallback(call)

    def _give_up(self, why: str) -> None:
        self.failure = why
        warnings.warn(
            f"compile=True: this model/guide could not be traced with the PyTorch JIT ({why}); "
            "training continues uncompiled. Tracing needs a model whose sample sites and shapes "
            "are the same every step, called with tensors only.",
            RuntimeWarning,
            stacklevel=5,
        )

    def _compile(
        self, shape, keys: tuple[int, tuple[str, ...]], tensors: list[torch.Tensor]
    ) -> Callable[[list[torch.Tensor]], torch.Tensor] | None:
        num_args, names = keys
        model, guide = self._model, self._guide

        def positional(fn: Callable[..., Any]) -> Callable[..., Any]:
            def call(*values: torch.Tensor):
                kwargs = dict(zip(names, values[num_args:], strict=True))
                return fn(*values[:num_args], **kwargs)

            return call

        elbo = _JitTraceELBO(ignore_jit_warnings=True)
        traced_model, traced_guide = positional(model), positional(guide)
        devices = [t.device.index or 0 for t in tensors if t.is_cuda]
        try:
            # Tracing runs the model several times; keep those draws out of the random stream.
            with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                # torch 2.13 marks torch.jit.trace deprecated in favour of torch.compile, which
                # measured no faster here and took ~36 s to compile cold (issue #7).
                warnings.filterwarnings(
                    "ignore", r".*torch\.jit\.trace. is deprecated", DeprecationWarning
                )
                elbo.differentiable_loss(traced_model, traced_guide, *tensors)
        except Exception as err:  # any tracing failure means: this model cannot be compiled
            self._give_up(_why(err))
            return None
        try:
            loss: Callable[[list[torch.Tensor]], torch.Tensor] = _Specialized(elbo)
        except Exception:  # TorchScript internals that a torch version lacks: the plain replay
            loss = lambda values: elbo.differentiable_loss(  # noqa: E731
                traced_model, traced_guide, *values
            )
        self._by_shape[shape] = loss
        return loss


def _why(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"


class _Specialized:
    """The graph ``elbo`` traced (for one input shape, dtype and device), specialised to that
    shape and called with the parameters straight from the param store.

    The passes are TorchScript's own: peephole turns the sizes of completely typed inputs into
    constants and drops no-op expands; constant propagation evaluates each node whose inputs are
    all constant (random nodes never are); CSE and DCE tidy up. What remains are the same
    operations on the same values, so the loss and its gradients are those of the traced graph.
    """

    def __init__(self, elbo: _JitTraceELBO) -> None:
        cache = elbo._loss_and_surrogate_loss  # pyro.ops.jit.CompiledFunction, traced once
        (traced,) = cache.compiled.values()
        self.names = list(cache._param_names)
        graph = traced.graph.copy()
        for _ in range(2):  # a fold can expose another size or no-op
            torch._C._jit_pass_peephole(graph, False)
            torch._C._jit_pass_constant_propagation(graph)
        torch._C._jit_pass_cse(graph)
        torch._C._jit_pass_dce(graph)
        self.function = torch._C._create_function_from_graph("lvmkit_specialized_elbo", graph)
        self.nodes = (len(list(traced.graph.nodes())), len(list(graph.nodes())))

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        unconstrained = dict(pyro.get_param_store().named_parameters())
        params = [unconstrained[name] for name in self.names]
        with torch.jit.optimized_execution(False):
            loss, surrogate = self.function(*params, *tensors)
        return _value_with_surrogate_gradient(loss, surrogate)


def _value_with_surrogate_gradient(loss: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """The loss's value with the surrogate's gradient (they differ for score-function terms)."""
    return loss.detach() + (surrogate - surrogate.detach())
