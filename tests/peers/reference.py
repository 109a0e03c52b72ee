"""Pyro's own SVI loop, run on the same initial weights and the same minibatches as ``lvmkit.fit``.

``fit`` takes each epoch's points in the order ``lvmkit.inference.train.epoch_order(seed, epoch,
n)``; :func:`pyro_loop` goes through the same order with ``pyro.infer.SVI`` (or, for several
sources, with the body of ``SVI.step`` — ``loss_and_grads`` on each source's minibatch, then one
update — since Pyro's SVI has no notion of several data sets) and reports the loss per point of
each epoch, as ``fit``'s history does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import SVI

from lvmkit.inference.loop import epoch_order


def minibatches(arrays: Sequence[torch.Tensor], batch_size: int, seed: int, epoch: int):
    """The minibatches ``fit`` draws in ``epoch`` (numbered from 1) of one source."""
    n = arrays[0].shape[0]
    order = epoch_order(seed, epoch, n)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        yield tuple(a[index] for a in arrays)


def pyro_loop(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    optim: Any,
    loss: Any,
    arrays: Sequence[torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    transform: Callable[..., tuple] | None = None,
) -> list[float]:
    """Pyro's ``SVI`` over ``fit``'s minibatches; the loss per point of each epoch."""
    svi = SVI(model, guide, optim, loss=loss)
    pyro.set_rng_seed(seed)
    n = arrays[0].shape[0]
    out = []
    for epoch in range(1, epochs + 1):
        total = 0.0
        for batch in minibatches(arrays, batch_size, seed, epoch):
            args = transform(*batch) if transform is not None else batch
            total += svi.step(*args)
        out.append(total / n)
    return out


def pyro_loop_two_sources(
    model, guide, optim, loss, first, second, *, epochs, batch_sizes, seed=0
) -> list[float]:
    """``SVI.step``'s body with one minibatch of each source per step: the summed loss's
    gradients, one update. Both sources pass once per epoch (their batch sizes say how)."""
    pyro.set_rng_seed(seed)
    n = first[0].shape[0] + second[0].shape[0]
    out = []
    for epoch in range(1, epochs + 1):
        total = 0.0
        pairs = zip(
            minibatches(first, batch_sizes[0], seed, epoch),
            _second(second, batch_sizes[1], seed, epoch),
            strict=False,
        )
        for a, b in pairs:
            with poutine.trace(param_only=True) as params:
                total += loss.loss_and_grads(model, guide, *a)
                total += loss.loss_and_grads(model, guide, *b)
            found = {site["value"].unconstrained() for site in params.trace.nodes.values()}
            optim(found)
            pyro.infer.util.zero_grads(found)
        out.append(total / n)
    return out


def _second(arrays, batch_size, seed, epoch):
    """The second source's minibatches as fit draws them (its own order for each pass)."""
    n = arrays[0].shape[0]
    order = epoch_order(seed, epoch, n, source=1, cycle=0)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        yield tuple(a[index] for a in arrays)


def pyro_loop_interleaved(
    model, guide, optim, loss, unsup, sup, *, epochs, batch_size, seed=0
) -> list[float]:
    """examples/vae/ss_vae_M2.py's ``run_inference_for_epoch``: one ``SVI.step`` per minibatch,
    a labelled one at every step ``i`` with ``i % periodic_interval_batches == 1`` while any are
    left, an unlabelled one otherwise; the loss per point of each epoch."""
    svi = SVI(model, guide, optim, loss=loss)
    pyro.set_rng_seed(seed)
    n_unsup, n_sup = unsup[0].shape[0], sup[0].shape[0]
    unsup_batches, sup_batches = -(-n_unsup // batch_size), -(-n_sup // batch_size)
    period = (unsup_batches + sup_batches) // sup_batches
    out = []
    for epoch in range(1, epochs + 1):
        unsup_iter = minibatches(unsup, batch_size, seed, epoch)
        sup_iter = _second(sup, batch_size, seed, epoch)
        total, ctr_sup = 0.0, 0
        for i in range(unsup_batches + sup_batches):
            if i % period == 1 and ctr_sup < sup_batches:
                total += svi.step(*next(sup_iter))
                ctr_sup += 1
            else:
                total += svi.step(*next(unsup_iter))
        out.append(total / (n_unsup + n_sup))
    return out
