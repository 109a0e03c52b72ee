"""Training objectives: Pyro's ELBOs without a device→host sync per step; IWAE and RWS.

Pyro 1.9's ``Trace_ELBO.differentiable_loss`` calls ``.item()`` on every sample site and checks the
loss for NaN on the host, so every SVI step waits for the device. The two classes here are Pyro's
``Trace_ELBO`` and ``TraceMeanField_ELBO`` with only the per-particle sum rewritten to stay on the
device; tracing, validation, particles and Rao-Blackwellisation of score-function terms are Pyro's
own. ``Objective()(model, guide)`` is a ``torch.nn.Module`` whose forward is the loss, as in Pyro.
Non-finite losses are caught by ``fit`` once per epoch instead of once per step.

:class:`IWAE`, its relatives of Rainforth et al. 2018 (:class:`MIWAE`, :class:`CIWAE`,
:class:`PIWAE`) and :class:`ReweightedWakeSleep` are written on the per-point log-density pass that
evaluation uses (:func:`lvmkit.inference.kernel.log_density_pass`): K draws per data point,
vectorised with a particle plate, a logsumexp over K per point.
"""

from __future__ import annotations

import math

import pyro
import pyro.infer
import pyro.poutine as poutine
import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.trace_elbo import _compute_log_r  # Pyro's own Rao-Blackwellised log-ratio
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from lvmkit.base import check_choice, check_float, check_int
from lvmkit.inference.calls import Data, call_of, cuda_devices, signature
from lvmkit.inference.kernel import Layout, log_density_pass, log_density_pass_split
from lvmkit.inference.layout import find_layout
from lvmkit.inference.params import eval_mode


class _OnDeviceLoss:
    """Mixin: ``differentiable_loss`` whose value and gradient never leave the device."""

    num_particles: int

    def differentiable_loss(self, model, guide, *args, **kwargs):
        value: torch.Tensor | float = 0.0
        surrogate: torch.Tensor | float = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):  # type: ignore[attr-defined]
            elbo, surrogate_elbo = self._elbo_particle(model_trace, guide_trace)
            value = value - elbo / self.num_particles
            surrogate = surrogate - surrogate_elbo / self.num_particles
        assert isinstance(value, torch.Tensor) and isinstance(surrogate, torch.Tensor)
        # The value is the ELBO's; the gradient is the surrogate's (they differ only for
        # score-function terms of non-reparameterized sites).
        return value.detach() + (surrogate - surrogate.detach())

    def _elbo_particle(self, model_trace, guide_trace) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class TraceELBO(_OnDeviceLoss, pyro.infer.Trace_ELBO):
    """Pyro's ``Trace_ELBO`` (Monte-Carlo KL, score-function terms for discrete sites)."""

    def _elbo_particle(self, model_trace, guide_trace):
        elbo: torch.Tensor | float = 0.0
        surrogate: torch.Tensor | float = 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                elbo = elbo + site["log_prob_sum"]
                surrogate = surrogate + site["log_prob_sum"]
        log_r = None
        for site in guide_trace.nodes.values():
            if site["type"] != "sample":
                continue
            _, score_function_term, entropy_term = site["score_parts"]
            elbo = elbo - site["log_prob_sum"]
            if not is_identically_zero(entropy_term):
                surrogate = surrogate - entropy_term.sum()
            if not is_identically_zero(score_function_term):
                if log_r is None:
                    log_r = _compute_log_r(model_trace, guide_trace)
                downstream = log_r.sum_to(site["cond_indep_stack"])
                surrogate = surrogate + (downstream * score_function_term).sum()
        return elbo.detach(), surrogate  # type: ignore[union-attr]


class TraceMeanFieldELBO(_OnDeviceLoss, pyro.infer.TraceMeanField_ELBO):
    """Pyro's ``TraceMeanField_ELBO``: analytic KL(q ‖ p) where torch knows it, else Monte Carlo."""

    def _elbo_particle(self, model_trace, guide_trace):
        elbo: torch.Tensor | float = 0.0
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample":
                continue
            if model_site["is_observed"]:
                elbo = elbo + model_site["log_prob_sum"]
                continue
            guide_site = guide_trace.nodes[name]
            if is_validation_enabled():
                check_fully_reparametrized(guide_site)
            try:
                kl = kl_divergence(guide_site["fn"], model_site["fn"])
            except NotImplementedError:
                entropy_term = guide_site["score_parts"].entropy_term
                elbo = elbo + model_site["log_prob_sum"] - entropy_term.sum()
            else:
                kl = scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])
                elbo = elbo - kl.sum()
        for name, guide_site in guide_trace.nodes.items():
            if guide_site["type"] == "sample" and name not in model_trace.nodes:
                # auxiliary guide sites: only their entropy enters the bound
                elbo = elbo - guide_site["score_parts"].entropy_term.sum()
        return elbo.detach(), elbo  # type: ignore[union-attr]


class PerPointBound(pyro.infer.Trace_ELBO):
    """Shared set-up of the K-sample objectives: the pair's layout found once per (model, guide)
    (its data plate, and whether its particles can be vectorised), and Trace_ELBO's single-trace
    ``_get_traces`` kept for ``fit``'s non-finite diagnosis."""

    needs_reparam = True

    def __init__(self, num_particles: int = 5) -> None:
        super().__init__(num_particles=check_int("num_particles", num_particles))
        self._layouts: dict[tuple[int, int], Layout] = {}
        self.data_plate: str | None = None  # set by fit from its data_plate=
        self.vectorize: bool | None = None  # as fit's vectorize_particles=

    def _layout(self, model, guide, call: Data) -> Layout:
        key = (id(model), id(guide))
        if key not in self._layouts:
            if self.needs_reparam:
                _check_reparameterized(guide, call, type(self).__name__)
            with eval_mode(model, guide):  # probing must not move BatchNorm's statistics
                layout = find_layout(
                    model, guide, call, plate=self.data_plate, vectorize=self.vectorize
                )
            if layout.global_sites:
                raise ValueError(
                    f"{type(self).__name__} is a bound per data point, but sites "
                    f"{list(layout.global_sites)} lie outside the data plate {layout.plate!r}; "
                    "train a model with global latents with objective='elbo'"
                )
            self._layouts[key] = layout
        return self._layouts[key]

    @staticmethod
    def _total(bound: torch.Tensor, layout: Layout) -> torch.Tensor:
        """The loss of per-point bounds ``(n,)``: their negative sum, scaled like the model's
        observed sites (N / n under a subsampling plate)."""
        return -bound.sum() * (layout.represented(bound.shape[0]) / bound.shape[0])

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())


class IWAE(PerPointBound):
    """The importance-weighted bound of Burda, Grosse & Salakhutdinov (ICLR 2016), as a loss:

        −Σ_n [logsumexp_k (log p(x_n, z_nk) − log q(z_nk | x_n)) − log K],  z_nk ~ q(z | x_n),

    reparameterized (the guide's latent sites must have ``rsample``; discrete latents that the
    model enumerates are summed out exactly). K = 1 is the ELBO; the bound rises with K towards
    log p(x). For any model/guide pair whose sites sit in ``pyro.plate("data", N)``; the sum is
    scaled like the model's observed sites (N / n under a subsampling plate). Site scales
    (``KLSchedule``) do not enter: the bound uses unscaled densities.

    Example (``fit(objective="iwae", num_particles=5)`` builds the same)::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                  hidden_dims=(8,)))
        >>> loss = lvmkit.IWAE(num_particles=5)(model, guide)  # an nn.Module
        >>> loss(x=torch.ones(3, 4)).shape
        torch.Size([])
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        call = call_of(args, kwargs)
        layout = self._layout(model, guide, call)
        k = self.num_particles
        log_p, log_q = log_density_pass(model, guide, call, k, layout)
        return self._total(_iwae(log_p - log_q), layout)


class MIWAE(PerPointBound):
    """The multiply importance-weighted bound of Rainforth et al. ("Tighter Variational Bounds
    are Not Necessarily Better", ICML 2018): the mean of M independent IWAE bounds of K draws,

        −Σ_n (1/M) Σ_m [logsumexp_k log w_nmk − log K],   log w = log p(x, z) − log q(z | x),

    M·K draws per point in one pass. M = 1 is :class:`IWAE` with K; K = 1 the ELBO averaged over
    M draws. For the encoder, a larger M at the same M·K gives a gradient with a better
    signal-to-noise ratio than the IWAE bound's; the bound itself is looser.

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                  hidden_dims=(8,)))
        >>> x = torch.bernoulli(torch.full((16, 4), 0.5))
        >>> result = lvmkit.fit(model, guide, x, epochs=1, objective=lvmkit.MIWAE(8, groups=8),
        ...                     progress=False)
        >>> list(result.history.epoch)
        [1]
    """

    def __init__(self, num_particles: int = 8, *, groups: int = 8) -> None:
        super().__init__(num_particles)  # K: draws in each of the M bounds
        self.groups = check_int("groups", groups)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        call = call_of(args, kwargs)
        layout = self._layout(model, guide, call)
        log_p, log_q = log_density_pass(
            model, guide, call, self.groups * self.num_particles, layout
        )
        return self._total(_miwae(log_p - log_q, self.groups), layout)


class CIWAE(PerPointBound):
    """The combination importance-weighted bound of Rainforth et al. (2018): with K draws,

        −Σ_n [β · (1/K) Σ_k log w_nk + (1 − β) · (logsumexp_k log w_nk − log K)],

    β = 1 the ELBO (averaged over K draws), β = 0 the IWAE bound. The paper's MNIST runs use
    β = 0.05.

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                  hidden_dims=(8,)))
        >>> loss = lvmkit.CIWAE(num_particles=5, beta=0.05)(model, guide)
        >>> loss(x=torch.ones(3, 4)).shape
        torch.Size([])
    """

    def __init__(self, num_particles: int = 64, *, beta: float = 0.05) -> None:
        super().__init__(num_particles)
        self.beta = _fraction("beta", beta)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        call = call_of(args, kwargs)
        layout = self._layout(model, guide, call)
        k = self.num_particles
        log_p, log_q = log_density_pass(model, guide, call, k, layout)
        log_w = log_p - log_q
        return self._total(self.beta * log_w.mean(0) + (1 - self.beta) * _iwae(log_w), layout)


class PIWAE(MIWAE):
    """The partially importance-weighted objective of Rainforth et al. (2018): the model follows
    the IWAE bound of all M·K draws, the guide the MIWAE bound of M groups of K — one backward
    pass, each gradient reaching its own parameters (the model is scored a second time at the
    same draws cut from the graph, whose gradient cancels the MIWAE term's on the model). The
    loss's value is the negative IWAE bound of the M·K draws.

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                  hidden_dims=(8,)))
        >>> loss = lvmkit.PIWAE(num_particles=8, groups=8)(model, guide)
        >>> loss(x=torch.ones(3, 4)).shape
        torch.Size([])
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        call = call_of(args, kwargs)
        layout = self._layout(model, guide, call)
        m, k = self.groups, self.num_particles
        log_p, log_q, log_p_cut = log_density_pass_split(model, guide, call, m * k, layout)
        log_w = log_p - log_q  # gradients: model and guide
        log_w_model = log_p_cut - log_q.detach()  # the same values; gradient: the model's only
        bound = _iwae(log_w_model) + _miwae(log_w, m) - _miwae(log_w_model, m)  # (n,)
        return self._total(bound, layout)


def _iwae(log_w: torch.Tensor) -> torch.Tensor:
    """The IWAE bound per point of log-weights ``(K, n)``: logsumexp over K, less log K."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


def _miwae(log_w: torch.Tensor, groups: int) -> torch.Tensor:
    """The mean of ``groups`` IWAE bounds, each over its own block of the K draws ``(K, n)``."""
    grouped = log_w.reshape(groups, log_w.shape[0] // groups, -1)
    return (torch.logsumexp(grouped, dim=1) - math.log(grouped.shape[1])).mean(0)


def _fraction(name: str, value: float) -> float:
    value = check_float(name, value, positive=False)
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1]; got {value}")
    return value


class ReweightedWakeSleep(PerPointBound):
    """Reweighted wake-sleep (Bornschein & Bengio, ICLR 2015), per data point.

    With K draws z_nk ~ q(z | x_n) cut from the graph and normalized weights w̃_nk ∝ p(x_n, z_nk)
    / q(z_nk | x_n): the model follows the IWAE bound's gradient (wake-θ), the guide minimises
    −Σ w̃_nk log q(z_nk | x_n) (wake-φ) and, with ``insomnia < 1``, also −log q(z | x) on
    (x, z) dreamt from the model (sleep-φ), mixed as ``insomnia · wake + (1 − insomnia) · sleep``.
    The loss's value is the negative IWAE bound, so ``fit``'s ``train_loss`` is comparable with
    the other objectives'; its gradient is the sum of both phases' (they touch disjoint
    parameters). No reparameterization is needed, so discrete latents work.

    Pyro's ``ReweightedWakeSleep`` normalizes the weights over the whole minibatch (one
    logsumexp of the minibatch's summed log-weights), not per data point; this one does it per
    point, as the paper and the IWAE bound do.

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                  hidden_dims=(8,)))
        >>> x = torch.bernoulli(torch.full((16, 4), 0.5))
        >>> result = lvmkit.fit(model, guide, x, epochs=1, objective="rws", num_particles=5,
        ...                     device="cpu", progress=False)
        >>> list(result.history.epoch)
        [1]
    """

    needs_reparam = False

    def __init__(self, num_particles: int = 5, insomnia: float = 1.0) -> None:
        super().__init__(num_particles)
        self.insomnia = _fraction("insomnia", insomnia)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        call = call_of(args, kwargs)
        layout = self._layout(model, guide, call)
        k = self.num_particles
        log_p, log_q = log_density_pass(model, guide, call, k, layout, detach=True)
        log_w = log_p - log_q.detach()
        lse = torch.logsumexp(log_w, dim=0)
        wake_theta = -(lse - math.log(k)).sum()
        phi = torch.zeros((), device=log_p.device)
        if self.insomnia > 0:
            normalized = torch.exp(log_w - lse).detach()
            phi = phi - self.insomnia * (normalized * log_q).sum()
        if self.insomnia < 1:
            phi = phi + (1 - self.insomnia) * _sleep_phi(model, guide, call)
        n = log_p.shape[1]
        return (wake_theta + phi - phi.detach()) * (layout.represented(n) / n)


def _sleep_phi(model, guide, call: Data) -> torch.Tensor:
    """−log q(z | x) for one (x, z) drawn from the model (observed sites unconditioned; the
    model's arguments named like one of its sites are replaced by its dreamt value)."""
    with torch.no_grad():
        dream = poutine.trace(poutine.uncondition(model)).get_trace(*call.args, **call.kwargs)
    args, kwargs = call.args, call.kwargs
    sig = signature(model)
    if sig is not None:
        bound = sig.bind_partial(*args, **kwargs)
        for key in list(bound.arguments):
            if key in dream.nodes and torch.is_tensor(bound.arguments[key]):
                bound.arguments[key] = dream.nodes[key]["value"].detach()
        args, kwargs = bound.args, bound.kwargs
    trace = poutine.trace(poutine.replay(guide, trace=dream)).get_trace(*args, **kwargs)
    trace.compute_log_prob()
    return -sum(
        site["log_prob"].sum()
        for site in trace.nodes.values()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and site["name"] in dream.nodes
    )


def _check_reparameterized(guide, call: Data, who: str) -> None:
    with torch.no_grad(), poutine.block(), torch.random.fork_rng(devices=cuda_devices(call)):
        trace = poutine.trace(guide).get_trace(*call.args, **call.kwargs)
    for name, site in trace.nodes.items():
        latent = site["type"] == "sample" and not site["is_observed"]
        if latent and not site_is_subsample(site) and not getattr(site["fn"], "has_rsample", False):
            raise ValueError(
                f"{who} needs a reparameterized guide, but guide site {name!r} "
                f"({type(site['fn']).__name__}) has no rsample: use objective='rws' "
                "(reweighted wake-sleep), or enumerate the discrete latent in the model"
            )


OBJECTIVES: dict[str, type[pyro.infer.ELBO]] = {
    "elbo": TraceELBO,
    "mean_field": TraceMeanFieldELBO,
    "iwae": IWAE,
    "rws": ReweightedWakeSleep,
}


def make_objective(
    objective: str | pyro.infer.ELBO, *, num_particles: int = 1, vectorize: bool = True
) -> pyro.infer.ELBO:
    """Return an ELBO instance from a name in :data:`OBJECTIVES` or a ready Pyro ELBO.

    ``"iwae"`` and ``"rws"`` take ``num_particles`` as their K (importance samples per point).
    ``vectorize``: draw the particles of ``"elbo"``/``"mean_field"`` in one vectorised pass (for
    models that broadcast over an extra leftmost dimension) rather than one by one. A Pyro ELBO
    passed in is used as it is (e.g. ``TraceEnum_ELBO(max_plate_nesting=1)``); note that Pyro's
    own classes sync with the host every step.
    """
    if isinstance(objective, pyro.infer.ELBO):
        return objective
    name = check_choice("objective", objective, OBJECTIVES)
    check_int("num_particles", num_particles)
    if name in ("iwae", "rws"):
        return OBJECTIVES[name](num_particles=num_particles)
    return OBJECTIVES[name](
        num_particles=num_particles, vectorize_particles=num_particles > 1 and vectorize
    )
