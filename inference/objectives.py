"""Training objectives: Pyro's ELBOs, computed without a device→host sync per step.

Pyro 1.9's ``Trace_ELBO.differentiable_loss`` calls ``.item()`` on every sample site and checks the
loss for NaN on the host, so every SVI step waits for the device. The two classes here are Pyro's
``Trace_ELBO`` and ``TraceMeanField_ELBO`` with only the per-particle sum rewritten to stay on the
device; tracing, validation, particles and Rao-Blackwellisation of score-function terms are Pyro's
own. ``Objective()(model, guide)`` is a ``torch.nn.Module`` whose forward is the loss, as in Pyro.
Non-finite losses are caught by ``fit`` once per epoch instead of once per step.
"""

from __future__ import annotations

import pyro.infer
import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.trace_elbo import _compute_log_r  # Pyro's own Rao-Blackwellised log-ratio
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled
from torch.distributions import kl_divergence

from lvmkit.models._checks import check_choice, check_int


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


OBJECTIVES: dict[str, type[pyro.infer.ELBO]] = {
    "elbo": TraceELBO,
    "mean_field": TraceMeanFieldELBO,
}


def make_objective(objective: str | pyro.infer.ELBO, *, num_particles: int = 1) -> pyro.infer.ELBO:
    """Return an ELBO instance from a name in :data:`OBJECTIVES` or a ready Pyro ELBO.

    A Pyro ELBO passed in is used as it is (e.g. ``TraceEnum_ELBO(max_plate_nesting=1)``); note
    that Pyro's own classes sync with the host every step.
    """
    if isinstance(objective, pyro.infer.ELBO):
        return objective
    name = check_choice("objective", objective, OBJECTIVES)
    check_int("num_particles", num_particles)
    return OBJECTIVES[name](num_particles=num_particles, vectorize_particles=num_particles > 1)
