"""Deterministic autoencoders of seed 003 as Pyro pairs: AE, denoising AE, contractive AE, AAE.

Each is a model p(x | z) — the VAE's decoder and likelihoods — whose prior on z is masked out of
the objective, and a guide that puts a point mass on the encoder's code, q(z | x) = δ(z − f(x)).
With both log-densities of z zero, the ELBO that ``fit`` maximises is log p(x | f(x)): the
reconstruction term alone (the binary cross-entropy for a Bernoulli decoder, the squared error
for a unit-variance Gaussian one). The variants differ only in the guide, and only in training
mode (``fit`` switches it on; evaluation switches it off); the guide is
:class:`lvmkit.guides.DeterministicEncoder`:

- ``"ae"``: nothing more;
- ``"dae"`` (Vincent et al., ICML 2008): the encoder sees x with a random ``corruption`` fraction
  of its entries set to 0 (masking noise) and must reconstruct the clean x;
- ``"cae"`` (Rifai et al., ICML 2011): the penalty λ‖∂f(x)/∂x‖²_F (``contraction`` = λ), the
  Frobenius norm of the encoder's Jacobian, computed exactly (one backward pass per unit);
- ``"aae"`` (Makhzani et al., ICLR 2016, deterministic encoder): a discriminator D(z) tells
  prior draws from codes; the encoder is also trained to fool it. The guide's ``adversary`` is D,
  so ``fit`` gives its parameters a group of their own in the optimizer (``adversary_lr``). One
  backward pass serves both players: D's loss sees the codes detached, and the encoder's loss
  sees D with its parameters detached, so each gradient reaches only its own player's parameters.

The penalties enter the loss as ``pyro.factor`` sites of the guide (a guide factor adds its value
to the loss); ``train_loss`` therefore includes them, and ``val_elbo`` does not. These models have
no density over z, so their "ELBO" is a reconstruction log-likelihood, not a bound on log p(x):
compare them by reconstruction error and by what their codes know (a probe), as the benchmark does.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

from lvmkit.base import check_choice, check_float, check_sizes
from lvmkit.models.vae import VAE, VAEConfig, num_points_of

KINDS = ("ae", "dae", "cae", "aae")


@dataclass(frozen=True)
class AutoencoderConfig:
    """Which deterministic autoencoder, and its regulariser's strength.

    The network sizes and the likelihood are a :class:`lvmkit.VAEConfig`'s (``vae``), so an AE
    and a VAE of the same shape can be compared directly.
    """

    vae: VAEConfig  # decoder / encoder sizes and the likelihood
    kind: str = "ae"  # one of KINDS
    corruption: float = 0.25  # "dae": fraction of input entries zeroed
    contraction: float = 0.1  # "cae": λ, weight of the encoder Jacobian's squared norm
    adversary_hidden: tuple[int, ...] = (256, 256)  # "aae": discriminator widths
    adversary_lr: float = 2e-4  # "aae": the discriminator's Adam learning rate
    adversarial_weight: float = 1.0  # "aae": weight of both players' losses

    def __post_init__(self) -> None:
        if not isinstance(self.vae, VAEConfig):
            raise TypeError(f"vae must be a VAEConfig; got {type(self.vae).__name__}")
        check_choice("kind", self.kind, KINDS)
        corruption = check_float("corruption", self.corruption, positive=False)
        if not 0 <= corruption < 1:
            raise ValueError(f"corruption must be in [0, 1); got {corruption}")
        check_float("contraction", self.contraction, nonnegative=True)
        object.__setattr__(
            self, "adversary_hidden", check_sizes("adversary_hidden", self.adversary_hidden)
        )
        check_float("adversary_lr", self.adversary_lr)
        check_float("adversarial_weight", self.adversarial_weight, nonnegative=True)


class Autoencoder(VAE):
    """p(x | z) of a :class:`lvmkit.VAE` with the prior's density masked out of the objective.

    Generation (``x=None``) still draws z from N(0, I), which is meaningful for the AAE (trained
    to match that prior) and only a sanity picture for the others.

    Example::

        >>> import lvmkit
        >>> vae = lvmkit.VAEConfig(data_dim=4, latent_dim=2, hidden_dims=(8,))
        >>> lvmkit.Autoencoder(vae)(batch_size=3).shape
        torch.Size([3, 4])
    """

    static_structure = False  # the guide's training-only branches must not be frozen in a graph

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None):
        n = num_points_of(x, batch_size)
        with pyro.plate("data", n):
            prior = dist.Normal(self.prior_loc, self.prior_scale).to_event(1)
            z = pyro.sample("z", prior.mask(x is None))  # batch (N,) event (Dz,)
            return pyro.sample("x", self.likelihood(z), obs=x)  # batch (N,) event (Dx,)


__all__ = [
    "KINDS",
    "Autoencoder",
    "AutoencoderConfig",
]
