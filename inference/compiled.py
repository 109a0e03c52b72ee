"""``fit(..., compile=True)``: the Trace_ELBO loss traced once per batch shape with the PyTorch JIT.

Pyro's per-step work — effect handlers, trace bookkeeping, distribution objects — is Python that
runs every step. Tracing the loss with ``torch.jit.trace`` (through Pyro's ``pyro.ops.jit.trace``,
which plumbs parameters by name) records the tensor operations once and replays them, which is
valid for models whose structure does not change between steps (no data-dependent control flow,
no new sample sites). On the 2-core CPU this brings the MNIST VAE step within ~1.1× of a
hand-written PyTorch loop (see ``lvmkit bench speed``).

Three things Pyro's own ``JitTrace_ELBO`` does not do, and this module does:

- one traced graph per batch shape: Pyro keys its cache by argument count, so the last, smaller
  minibatch of an epoch would replay a graph traced for the full batch size;
- tensors always reach the traced function positionally (tensor keyword arguments would be hashed
  by identity, recompiling every step);
- no NaN check on the host per step, and compilation runs under ``torch.random.fork_rng`` so that
  it draws nothing from the random stream: resumed runs stay identical to uninterrupted ones.

Models that cannot be traced fall back to the uncompiled loss with a warning that says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pyro.infer
import torch

from lvmkit.inference._data import Batch


class _JitTraceELBO(pyro.infer.JitTrace_ELBO):
    """Pyro's JitTrace_ELBO without the per-step host-side NaN check."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss, surrogate = self.loss_and_surrogate_loss(model, guide, *args, **kwargs)
        return loss + (surrogate - surrogate.detach())


class CompiledLoss:
    """The Trace_ELBO loss of ``model``/``guide`` on a batch dict, traced once per batch shape.

    ``fallback`` computes the same loss uncompiled; it is used from the first failure on.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        guide: Callable[..., Any],
        keys: list[str],
        fallback: Callable[[Batch], torch.Tensor],
    ) -> None:
        self.keys = keys
        self.fallback = fallback
        self.failure: str | None = None
        self._by_shape: dict[tuple[tuple[int, ...], ...], _JitTraceELBO] = {}

        def positional_model(*tensors: torch.Tensor):
            return model(**dict(zip(keys, tensors, strict=True)))

        def positional_guide(*tensors: torch.Tensor):
            return guide(**dict(zip(keys, tensors, strict=True)))

        self._model, self._guide = positional_model, positional_guide

    def __call__(self, batch: Batch) -> torch.Tensor:
        if self.failure is not None:
            return self.fallback(batch)
        tensors = [batch[key] for key in self.keys]
        shape = tuple(tuple(t.shape) for t in tensors)
        elbo = self._by_shape.get(shape)
        if elbo is None:
            elbo = self._compile(shape, tensors)
            if elbo is None:
                return self.fallback(batch)
        return elbo.differentiable_loss(self._model, self._guide, *tensors)

    def _compile(self, shape, tensors: list[torch.Tensor]) -> _JitTraceELBO | None:
        elbo = _JitTraceELBO(ignore_jit_warnings=True)
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
                elbo.differentiable_loss(self._model, self._guide, *tensors)
        except Exception as err:  # any tracing failure means: this model cannot be compiled
            self.failure = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            warnings.warn(
                "compile=True: this model/guide could not be traced with the PyTorch JIT "
                f"({self.failure}); training continues uncompiled. Tracing needs a model whose "
                "sample sites and shapes are the same every step.",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        self._by_shape[shape] = elbo
        return elbo
