"""Annealed importance sampling (AIS) of log p(x) per data point, and its BDMC sandwich.

Importance sampling from the guide is only as good as the guide: where q(z | x) misses p(z | x)
the K-sample estimate stays nats below log p(x) (Pareto k̂ says so). AIS (Neal 2001) moves C
chains from q(z | x) to p(z | x) through the intermediate densities

    f_t(z) = q(z | x)^(1 − β_t) p(x, z)^β_t,   0 = β_0 < β_1 < … < β_T = 1,

each step reweighting by f_t / f_{t−1} = exp((β_t − β_{t−1}) (log p(x, z) − log q(z | x))) and
then moving z by an HMC transition that leaves f_t invariant. The weights' mean is an unbiased
estimate of p(x), so the log of their mean over chains is a stochastic lower bound of log p(x)
that tightens as T grows. Run backwards from an exact posterior sample — available for data
simulated from the model — the same chain gives an unbiased estimate of 1 / p(x), hence a
stochastic upper bound: bidirectional Monte Carlo (Grosse, Ghahramani & Adams 2015; Wu, Burda,
Salakhutdinov & Grosse 2017, whose settings are the defaults here: a sigmoid schedule, 10
leapfrog steps, one step size per point adapted towards 65 % acceptance).

Both run on the model's continuous latent sites that the guide proposes in the data plate (in
the unconstrained space of each site's support), vectorised over chains and points with the
evaluation kernel's particle plate; the model's enumerated discrete sites are summed out as in
:func:`lvmkit.inference.kernel.log_densities`. Global sites must be point masses in the guide
(``AutoDelta``): they are held fixed.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.trace_struct import Trace
from torch.distributions import biject_to

from lvmkit.inference.calls import Data
from lvmkit.inference.kernel import (
    PARTICLE_PLATE,
    Layout,
    in_plate,
    is_sample,
    log_densities,
    paired_traces,
)

LEAPFROG_STEPS = 10  # Wu et al. (2017)'s eval_gen
TARGET_ACCEPT = 0.65  # ... and its adaptation target
INITIAL_STEP_SIZE = 0.1
STEP_SIZE_CHANGE = 1.02  # step size × this after a step above the target, ÷ below


def sigmoid_schedule(num_steps: int, rad: float = 4.0) -> torch.Tensor:
    """β_0 = 0 < … < β_T = 1, dense near both ends (Grosse et al. 2015's sigmoid schedule).

    Example::

        >>> betas = sigmoid_schedule(4)
        >>> [round(float(b), 3) for b in betas]
        [0.0, 0.105, 0.5, 0.895, 1.0]
    """
    if num_steps == 1:
        return torch.tensor([0.0, 1.0], dtype=torch.float64)
    s = torch.sigmoid(torch.linspace(-rad, rad, num_steps + 1, dtype=torch.float64))
    return (s - s[0]) / (s[-1] - s[0])


@dataclass
class State:
    """The chains: each latent site's unconstrained value ``(C, n, *event)``, and at it the
    log-densities ``(C, n)``: log p(x, z), log q(z | x) and the log-Jacobian of the support."""

    u: dict[str, torch.Tensor]
    log_p: torch.Tensor
    log_q: torch.Tensor
    log_jac: torch.Tensor


class Target:
    """log p(x, z) and log q(z | x) of a pair at given latent values, per chain and point."""

    def __init__(self, model, guide, call: Data, layout: Layout, chains: int, n: int) -> None:
        self.model, self.guide, self.call, self.layout = model, guide, call, layout
        self.chains, self.n = chains, n
        with pyro.plate(PARTICLE_PLATE, chains, dim=layout.particle_dim):
            first = paired_traces(model, guide, call, enum_dim=layout.particle_dim - 1)
        self.sites: dict[str, Any] = {}
        for name in first.latents:
            site = first.guide.nodes[name]
            if name not in first.model.nodes or not in_plate(site, layout.plate):
                continue
            if site["fn"].support.is_discrete:
                raise ValueError(
                    f"AIS moves continuous latents; the guide's site {name!r} is discrete. "
                    "Enumerate it in the model instead (infer={'enumerate': 'parallel'}), or "
                    "score the pair with importance sampling (method='is')"
                )
            self.sites[name] = site
        if not self.sites:
            raise ValueError("AIS found no continuous latent site of the guide in the data plate")
        self.first = first
        self.transforms = {name: biject_to(s["fn"].support) for name, s in self.sites.items()}

    def initial(self) -> State:
        """The chains' start: the guide's draws (the first trace)."""
        u = {
            name: self.transforms[name].inv(site["value"].detach())
            for name, site in self.sites.items()
        }
        return self.evaluate(u)

    def evaluate(self, u: dict[str, torch.Tensor], *, grad: bool = False) -> State:
        values, log_jac = {}, torch.zeros(self.chains, self.n, device=self.call_device)
        for name, value in u.items():
            transform = self.transforms[name]
            z = transform(value)
            values[name] = z
            jac = transform.log_abs_det_jacobian(value, z)  # (its own event dims summed)
            log_jac = log_jac + jac.expand(value.shape[: jac.dim()]).reshape(
                self.chains, self.n, -1
            ).sum(-1)
        trace = Trace()
        for name, z in values.items():
            trace.add_node(name, type="sample", value=z, is_observed=False, infer={})
        replayed = poutine.replay(self.guide, trace=trace)
        with pyro.plate(PARTICLE_PLATE, self.chains, dim=self.layout.particle_dim):
            traces = paired_traces(
                self.model, replayed, self.call, enum_dim=self.layout.particle_dim - 1
            )
        log_p, log_q = log_densities(traces, self.layout, self.chains, self.n, self.call_device)
        return State(u, log_p, log_q, log_jac)

    @property
    def call_device(self) -> torch.device:
        tensors = self.call.tensors()
        return tensors[0].device if tensors else torch.device("cpu")


def _log_f(state: State, beta: float) -> torch.Tensor:
    """log f_β in the unconstrained space, per chain and point."""
    return (1.0 - beta) * state.log_q + beta * state.log_p + state.log_jac


def _hmc(target: Target, state: State, beta: float, step: torch.Tensor):
    """One HMC transition leaving f_β invariant, per chain and point; returns the new state and
    the acceptance probability ``(C, n)``. ``step``: the step size per point ``(n,)``."""
    u0 = {k: v.detach().requires_grad_(True) for k, v in state.u.items()}
    with torch.enable_grad():
        s0 = target.evaluate(u0)
        lf0 = _log_f(s0, beta)
        grads = torch.autograd.grad(lf0.sum(), list(u0.values()))
    momentum = {k: torch.randn_like(v) for k, v in u0.items()}
    kinetic0 = sum(_per_point(m**2 / 2, target) for m in momentum.values())

    def scaled(name: str) -> torch.Tensor:
        value = u0[name]
        return step.reshape((1, -1) + (1,) * (value.dim() - 2)).to(value.dtype)

    u = {k: v.detach() for k, v in u0.items()}
    r = {k: momentum[k] + scaled(k) / 2 * g for k, g in zip(u0, grads, strict=True)}
    lf = lf0
    for i in range(LEAPFROG_STEPS):
        u = {k: (u[k] + scaled(k) * r[k]).detach().requires_grad_(True) for k in u}
        with torch.enable_grad():
            s1 = target.evaluate(u)
            lf = _log_f(s1, beta)
            grads = torch.autograd.grad(lf.sum(), list(u.values()))
        last = i == LEAPFROG_STEPS - 1
        factor = 0.5 if last else 1.0
        r = {k: r[k] + factor * scaled(k) * g for k, g in zip(u, grads, strict=True)}
    kinetic1 = sum(_per_point(m**2 / 2, target) for m in r.values())
    log_accept = (lf.detach() - kinetic1) - (lf0.detach() - kinetic0)
    log_accept = torch.nan_to_num(log_accept, nan=-math.inf)
    accept = log_accept.clamp(max=0.0).exp()
    take = torch.rand_like(accept) < accept  # (C, n)
    new_u = {}
    for k in u:
        mask = take.reshape(take.shape + (1,) * (u[k].dim() - 2))
        new_u[k] = torch.where(mask, u[k].detach(), state.u[k])
    new = State(
        new_u,
        torch.where(take, s1.log_p.detach(), state.log_p),
        torch.where(take, s1.log_q.detach(), state.log_q),
        torch.where(take, s1.log_jac.detach(), state.log_jac),
    )
    return new, accept


def _per_point(tensor: torch.Tensor, target: Target) -> torch.Tensor:
    """Sum everything but the (chain, point) dims."""
    return tensor.reshape(target.chains, target.n, -1).sum(-1)


def anneal(
    model,
    guide,
    call: Data,
    layout: Layout,
    num_chains: int,
    num_steps: int,
    *,
    start: State | None = None,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One AIS run over a chunk of points: ``(log weights (C, n), ELBO terms (C, n))``.

    Forward (default): chains start at the guide's draws and the log weights' mean estimates
    p(x). ``reverse``: chains start at ``start`` (exact posterior samples) and run from β = 1 to
    0; the log weights' mean estimates 1 / p(x)."""
    n = call.num_points or 1
    target = Target(model, guide, call, layout, num_chains, n)
    state = start if start is not None else target.initial()
    elbo = (state.log_p - state.log_q).detach()
    betas = sigmoid_schedule(num_steps).tolist()
    if reverse:
        betas = betas[::-1]
    step = torch.full((n,), INITIAL_STEP_SIZE, device=state.log_p.device)
    log_w = torch.zeros_like(state.log_p)
    for previous, beta in itertools.pairwise(betas):
        log_w = log_w + (beta - previous) * (state.log_p - state.log_q)
        state, accept = _hmc(target, state, beta, step)
        rate = accept.mean(dim=0)  # per point, over chains
        step = torch.where(rate > TARGET_ACCEPT, step * STEP_SIZE_CHANGE, step / STEP_SIZE_CHANGE)
    return log_w.detach(), elbo


def exact_start(
    model, guide, call: Data, layout: Layout, num_chains: int, latents: dict[str, torch.Tensor]
) -> State:
    """The reverse chains' start: the latents the data were simulated with (each point's value
    copied to every chain), an exact draw from p(z | x)."""
    n = call.num_points or 1
    target = Target(model, guide, call, layout, num_chains, n)
    u = {}
    for name in target.sites:
        if name not in latents:
            raise ValueError(f"the simulated trace has no value for the guide's site {name!r}")
        value = latents[name].to(target.call_device)
        u[name] = target.transforms[name].inv(value.expand(num_chains, *value.shape))
    return target.evaluate(u)


def is_sampled_latent(site: Any) -> bool:
    return is_sample(site) and not site["is_observed"]


def prior_guide(model):
    """The model's own prior as a guide: its latent sites drawn from their priors, its observed
    sites left out (AIS's chains started from the prior, ``method="ais-prior"``)."""
    return poutine.block(model, hide_fn=lambda msg: bool(msg.get("is_observed")))


# -- the gap split (Cremer, Li & Duvenaud 2018) ---------------------------------------------------
