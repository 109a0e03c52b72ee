"""β and KL warm-up: the weight of the latent sites in the training objective.

A :class:`KLSchedule` gives the weight w of every latent (unobserved) sample site — in the model
and in the guide — as a function of training progress, and :class:`LatentScale` applies it the way
Pyro scales anything, by multiplying the sites' ``scale`` (what ``poutine.scale`` does), so that
the ELBO becomes E_q[log p(x | z)] − w · KL(q(z | x) ‖ p(z)) for any model/guide pair:

- β-VAE (Higgins et al., ICLR 2017): a constant w = β;
- KL warm-up / annealing (Bowman et al., CoNLL 2016; Sønderby et al., NeurIPS 2016): w rises
  linearly from ``start`` to β over the first ``warmup_epochs`` epochs, per step.

Only the training objective is weighted. ``fit`` logs w per epoch (history column ``kl_weight``)
beside the weighted training loss, and its ``val_elbo`` and everything :mod:`evaluate` reports use
unscaled log-densities: the true ELBO and likelihood, whatever the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from lvmkit.base import check_float


@dataclass(frozen=True)
class KLSchedule:
    """Weight of the latent sites: ``start`` → ``beta`` linearly over ``warmup_epochs`` epochs.

    Example::

        >>> from lvmkit import KLSchedule
        >>> schedule = KLSchedule(beta=1.0, warmup_epochs=10)
        >>> schedule.weight(0.0), schedule.weight(2.5), schedule.weight(50.0)
        (0.0, 0.25, 1.0)
    """

    beta: float = 1.0  # final weight: β of the β-VAE (1: the plain ELBO)
    warmup_epochs: float = 0.0  # epochs of the linear ramp (0: the weight is beta throughout)
    start: float = 0.0  # weight at the first step of the ramp

    def __post_init__(self) -> None:
        for name in ("beta", "warmup_epochs", "start"):
            value = check_float(f"KLSchedule.{name}", getattr(self, name), nonnegative=True)
            object.__setattr__(self, name, value)

    @property
    def constant(self) -> bool:
        return self.warmup_epochs == 0 or self.start == self.beta

    def weight(self, epochs_done: float) -> float:
        """The weight after ``epochs_done`` epochs of training (fractions count steps)."""
        if self.constant or epochs_done >= self.warmup_epochs:
            return self.beta
        return self.start + (self.beta - self.start) * max(0.0, epochs_done) / self.warmup_epochs

    def to_dict(self) -> dict[str, float]:
        return {"beta": self.beta, "warmup_epochs": self.warmup_epochs, "start": self.start}


class LatentScale(Messenger):
    """Multiply the ``scale`` of every unobserved sample site by ``self.weight`` (a float that the
    training loop sets before each step). Observed sites, ``pyro.factor`` terms and plates'
    subsample sites are left alone."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def _process_message(self, msg: Any) -> None:
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = msg["scale"] * self.weight
