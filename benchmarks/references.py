"""Hand-written PyTorch training loops: the textbook implementations the VAE and M2 suites set
beside ``lvmkit.fit`` at the same budget, so that "trains like the standard loop" is measured.

Each loop trains the *same* networks (lvmkit's modules, built from the same seed) on the same
data with the same optimizer, schedule, batch size and epochs, but computes the objective by hand
in plain torch — no Pyro, no lvmkit — exactly as a paper's code would: reparameterised samples,
log densities written out, the loss summed over the minibatch. The trained modules are then
scored by the suite's own evaluation, like every other contender.

- :func:`train_vae`: the VAE's ELBO (k samples averaged) or the IWAE bound (log-mean-exp of k
  importance weights), Bernoulli decoder, Gaussian encoder (Kingma & Welling 2014; Burda et al.
  2016);
- :func:`train_m2`: Kingma et al.'s M2 objective, the class summed out of the unlabelled term,
  α log q(y | x) on the labelled images, each image once an epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

LOG_2PI = math.log(2 * math.pi)


def _std_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def _gaussian_log_prob(z, loc, scale) -> torch.Tensor:
    return (-0.5 * ((z - loc) / scale).pow(2) - scale.log() - 0.5 * LOG_2PI).sum(-1)


def _bernoulli_log_prob(logits, x) -> torch.Tensor:
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(
        -1
    )


def vae_log_weights(decoder, encoder, x: torch.Tensor, k: int) -> torch.Tensor:
    """log p(x, z_i) − log q(z_i | x) for k reparameterised draws: shape (k, N)."""
    loc, log_var = encoder(x).chunk(2, dim=-1)
    scale = torch.exp(0.5 * log_var)
    z = loc + scale * torch.randn(k, *loc.shape)
    return (
        _bernoulli_log_prob(decoder(z), x)
        + _std_normal_log_prob(z)
        - _gaussian_log_prob(z, loc, scale)
    )


def _steps(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return list(order.split(batch_size))


def train_vae(
    decoder: torch.nn.Module,
    encoder: torch.nn.Module,
    x: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    schedule: Callable[[int], float] | None = None,
    objective: str = "elbo",
    k: int = 1,
    binarize: bool = True,
    seed: int = 0,
    on_epoch: Callable[[int], None] | None = None,
) -> None:
    """Train ``decoder`` (z → logits) and ``encoder`` (x → loc, log-variance) by hand.
    ``schedule``: the learning-rate factor of each step (torch's ``LambdaLR``), per step."""
    params = [*decoder.parameters(), *encoder.parameters()]
    opt = optimizer(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if schedule is not None else None
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        for index in _steps(len(x), batch_size, generator):
            batch = x[index]
            if binarize:  # dynamic binarization: a fresh draw of each image every time
                batch = torch.bernoulli(batch)
            log_w = vae_log_weights(decoder, encoder, batch, k)
            if objective == "iwae":
                bound = torch.logsumexp(log_w, 0) - math.log(k)
            else:
                bound = log_w.mean(0)
            loss = -bound.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
        if on_epoch is not None:
            on_epoch(epoch)


def _m2_bound(decoder, encoder, x: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    """L(x, y) = log p(x | y, z) + log p(y) + log p(z) − log q(z | x, y), one draw of z."""
    one_hot = F.one_hot(y, classes).to(x.dtype)
    loc, log_var = encoder(torch.cat([x, one_hot], -1)).chunk(2, dim=-1)
    scale = torch.exp(0.5 * log_var)
    z = loc + scale * torch.randn_like(loc)
    logits = decoder(torch.cat([z, one_hot], -1))
    return (
        _bernoulli_log_prob(logits, x)
        - math.log(classes)
        + _std_normal_log_prob(z)
        - _gaussian_log_prob(z, loc, scale)
    )


def m2_loss(decoder, encoder, classifier, xu, xl, yl, *, classes: int, alpha: float):
    """−(Σ U(x) over the unlabelled images + Σ L(x, y) + α Σ log q(y | x) over the labelled),
    with U(x) = Σ_y q(y | x) L(x, y) + H(q(y | x)): the class summed out exactly."""
    total = torch.zeros(())
    if len(xu):
        log_q = torch.log_softmax(classifier(xu), -1)  # (N, C)
        ys = torch.arange(classes).repeat_interleave(len(xu))  # (C·N,) class-major
        bounds = _m2_bound(decoder, encoder, xu.repeat(classes, 1), ys, classes)
        bounds = bounds.reshape(classes, len(xu)).T  # (N, C)
        q = log_q.exp()
        total = total + (q * (bounds - log_q)).sum()
    if len(xl):
        total = total + _m2_bound(decoder, encoder, xl, yl, classes).sum()
        log_q_l = torch.log_softmax(classifier(xl), -1).gather(1, yl[:, None]).squeeze(1)
        total = total + alpha * log_q_l.sum()
    return -total


def train_m2(
    decoder: torch.nn.Module,
    encoder: torch.nn.Module,
    classifier: torch.nn.Module,
    unlabelled: torch.Tensor,
    xl: torch.Tensor,
    yl: torch.Tensor,
    *,
    classes: int,
    alpha: float,
    epochs: int,
    batch_size: int,
    optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    seed: int = 0,
    on_epoch: Callable[[int], None] | None = None,
) -> None:
    """M2 by hand: each step a minibatch of unlabelled images and an even share of the
    labelled ones (each image once an epoch, as ``fit`` does with two auto sources)."""
    params: list[Any] = [*decoder.parameters(), *encoder.parameters(), *classifier.parameters()]
    opt = optimizer(params)
    generator = torch.Generator().manual_seed(seed)
    yl = yl.long()
    for epoch in range(1, epochs + 1):
        steps = _steps(len(unlabelled), batch_size, generator)
        order_l = torch.randperm(len(xl), generator=generator)
        edges = [round(i * len(xl) / len(steps)) for i in range(len(steps) + 1)]
        for i, index in enumerate(steps):
            share = order_l[edges[i] : edges[i + 1]]
            loss = m2_loss(
                decoder,
                encoder,
                classifier,
                unlabelled[index],
                xl[share],
                yl[share],
                classes=classes,
                alpha=alpha,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch)


__all__ = ["m2_loss", "train_m2", "train_vae", "vae_log_weights"]
