"""Builders: each returns a model of :mod:`lvmkit.models` with the guide of :mod:`lvmkit.guides`
that goes with it — the one module that knows both, so neither layer imports the other's
pairings.

Example::

    >>> import lvmkit
    >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=784, latent_dim=20))
    >>> type(model).__name__, type(guide).__name__
    ('VAE', 'GaussianEncoder')
"""

from __future__ import annotations

from typing import Any

from lvmkit.guides import (
    ConditionalEncoder,
    DeterministicEncoder,
    GaussianEncoder,
    GaussianEncoderConfig,
    HamiltonianEncoder,
    IAFEncoder,
    MarkovGuide,
    RecurrentEncoder,
    SemiSupervisedEncoder,
    StackedSemiSupervisedEncoder,
    VQEncoder,
)
from lvmkit.models import (
    CVAE,
    M2,
    VAE,
    Autoencoder,
    AutoencoderConfig,
    CVAEConfig,
    DeepMarkovModel,
    DMMConfig,
    HamiltonianVAE,
    M2Config,
    NonlinearConfig,
    NonlinearLVM,
    RecurrentVAE,
    RecurrentVAEConfig,
    StackedM2,
    VAEConfig,
    VQVAEConfig,
    empty_guide,
)
from lvmkit.models.vampprior import VampPrior, VampVAE
from lvmkit.models.vqvae import VQVAE, Codebook, CodePrior


def build_vae(config: VAEConfig) -> tuple[VAE, GaussianEncoder]:
    """A :class:`VAE` and the :class:`GaussianEncoder` that mirrors its decoder.

    Example::

        >>> import lvmkit
        >>> model, guide = lvmkit.build_vae(lvmkit.VAEConfig(data_dim=784, latent_dim=20))
        >>> guide.config.hidden_dims, model.config.hidden_dims
        ((400,), (400,))
    """
    guide_config = GaussianEncoderConfig(
        data_dim=config.data_dim,
        latent_dim=config.latent_dim,
        hidden_dims=tuple(reversed(config.hidden_dims)),
        activation=config.activation,
    )
    return VAE(config), GaussianEncoder(guide_config)


def build_vamp_vae(config: VAEConfig, *, num_pseudo: int = 500) -> tuple[VampVAE, GaussianEncoder]:
    """A :class:`~lvmkit.models.VampVAE` and its :class:`GaussianEncoder`: the model's prior is
    the mixture of this encoder's posteriors at ``num_pseudo`` learned pseudo-inputs.

    Example::

        >>> import lvmkit
        >>> model, guide = lvmkit.build_vamp_vae(lvmkit.VAEConfig(data_dim=784), num_pseudo=500)
        >>> tuple(model.prior.pseudo_inputs.shape)
        (500, 784)
    """
    _, guide = build_vae(config)
    return VampVAE(config, VampPrior(guide, config.data_dim, num_pseudo)), guide


def build_iaf_vae(
    config: VAEConfig, *, num_flows: int = 2, flow_hidden: tuple[int, ...] | None = None
) -> tuple[VAE, IAFEncoder]:
    """A :class:`VAE` and an :class:`IAFEncoder`: the Gaussian encoder that mirrors its decoder,
    followed by ``num_flows`` inverse autoregressive transforms.

    Example::

        >>> import lvmkit
        >>> model, guide = lvmkit.build_iaf_vae(lvmkit.VAEConfig(data_dim=784), num_flows=2)
        >>> len(guide.flows), type(model).__name__
        (2, 'VAE')
    """
    model, gaussian = build_vae(config)
    guide = IAFEncoder(gaussian.config, num_flows=num_flows, flow_hidden=flow_hidden)
    return model, guide


def build_hvae(
    config: VAEConfig,
    *,
    num_steps: int = 4,
    step_size: float = 0.01,
    beta0: float = 0.3,
    learn_step_size: bool = True,
    learn_beta0: bool = True,
) -> tuple[HamiltonianVAE, HamiltonianEncoder]:
    """A :class:`~lvmkit.models.HamiltonianVAE` and its :class:`HamiltonianEncoder`: the Gaussian
    encoder that mirrors the decoder, then ``num_steps`` tempered leapfrog steps on the model's
    log p(x, z) (Caterini et al. 2018; the options are the encoder's).

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_hvae(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                                   hidden_dims=(8,)))
        >>> x = torch.bernoulli(torch.full((32, 4), 0.5))
        >>> result = lvmkit.fit(model, guide, x, epochs=1, device="cpu", progress=False)
        >>> guide.num_steps, float(guide.beta0.detach()) < 1
        (4, True)
    """
    _, gaussian = build_vae(config)
    model = HamiltonianVAE(config)
    guide = HamiltonianEncoder(
        gaussian.config, model.log_joint, num_steps=num_steps, step_size=step_size, beta0=beta0,
        learn_step_size=learn_step_size, learn_beta0=learn_beta0,
    )  # fmt: skip
    return model, guide


def build_autoencoder(config: AutoencoderConfig):
    """The model and guide of ``config.kind``.

    Example::

        >>> import torch, lvmkit
        >>> cfg = lvmkit.AutoencoderConfig(lvmkit.VAEConfig(data_dim=4, latent_dim=2,
        ...                                hidden_dims=(8,)), kind="cae")
        >>> model, guide = lvmkit.build_autoencoder(cfg)
        >>> x = torch.bernoulli(torch.full((32, 4), 0.5))
        >>> result = lvmkit.fit(model, guide, x, epochs=1, device="cpu", progress=False)
        >>> list(result.history.epoch)
        [1]
    """

    if not isinstance(config, AutoencoderConfig):
        raise TypeError(f"config must be an AutoencoderConfig; got {type(config).__name__}")
    return Autoencoder(config.vae), DeterministicEncoder(config)


def build_cvae(config: CVAEConfig):
    """A :class:`CVAE` and its recognition network q(z | x, c).

    Example::

        >>> import torch, lvmkit
        >>> cfg = lvmkit.CVAEConfig(data_dim=4, cond_dim=4, latent_dim=2, hidden_dims=(8,))
        >>> model, guide = lvmkit.build_cvae(cfg)
        >>> guide(torch.ones(3, 4), c=torch.zeros(3, 4)).shape
        torch.Size([3, 2])
    """

    return CVAE(config), ConditionalEncoder(config)


def build_m2(config: M2Config):
    """An :class:`M2` model and its :class:`lvmkit.guides.SemiSupervisedEncoder`, the model
    holding the guide's classifier for the auxiliary term.

    Example::

        >>> import lvmkit
        >>> model, guide = lvmkit.build_m2(lvmkit.M2Config(data_dim=4, num_classes=3,
        ...                                latent_dim=2, hidden_dims=(8,)))
        >>> model.classifier is guide.classifier
        True
    """

    guide = SemiSupervisedEncoder(config)
    return M2(config, classifier=guide.classifier), guide


def build_m1_m2(config: M2Config, m1_model: Any, m1_guide: Any):
    """The stacked M1+M2 pair on a trained M1 (``m1_model`` with ``likelihood(z)``, ``m1_guide``
    with ``encode(x) → (loc, scale)``, e.g. an :class:`lvmkit.VAE` and its
    :class:`lvmkit.GaussianEncoder` after ``fit``): a :class:`StackedM2` and its
    :class:`lvmkit.guides.StackedSemiSupervisedEncoder`, sharing the classifier q(y | z₁). M1's
    networks are held, not copied, and are not trained further; ``config.data_dim`` must be M1's
    latent size.

    Example::

        >>> import torch, lvmkit
        >>> m1 = lvmkit.VAE(lvmkit.VAEConfig(data_dim=4, latent_dim=3, hidden_dims=(8,)))
        >>> enc = lvmkit.GaussianEncoder(lvmkit.GaussianEncoderConfig(4, 3, (8,)))
        >>> # ... lvmkit.fit(m1, enc, images) first: M1 learns from every image, labels unused
        >>> cfg = lvmkit.M2Config(data_dim=3, num_classes=2, latent_dim=2, hidden_dims=(8,))
        >>> model, guide = lvmkit.build_m1_m2(cfg, m1, enc)
        >>> guide.classify(torch.zeros(5, 4)).shape  # q(y | z₁) at M1's posterior mean
        torch.Size([5])
    """

    m1_latent = getattr(getattr(m1_model, "config", None), "latent_dim", config.data_dim)
    if m1_latent != config.data_dim:
        raise ValueError(
            f"config.data_dim must be M1's latent size {m1_latent} (M2 models M1's code z₁); "
            f"got {config.data_dim}"
        )
    guide = StackedSemiSupervisedEncoder(config, m1_guide)
    return StackedM2(config, m1_model, classifier=guide.classifier), guide


def build_nonlinear(config: NonlinearConfig, *, encoder_hidden: tuple[int, ...] | None = None):
    """A :class:`NonlinearLVM` and the Gaussian encoder q(z | x) that goes with it.

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_nonlinear(lvmkit.NonlinearConfig(data_dim=2))
        >>> model(batch_size=5).shape, guide(torch.zeros(5, 2)).shape
        (torch.Size([5, 2]), torch.Size([5, 2]))
    """

    guide_config = GaussianEncoderConfig(
        data_dim=config.data_dim,
        latent_dim=config.latent_dim,
        hidden_dims=encoder_hidden or config.hidden_dims,
        activation=config.activation,
    )
    return NonlinearLVM(config), GaussianEncoder(guide_config)


def build_recurrent_vae(config: RecurrentVAEConfig):
    """``(RecurrentVAE, RecurrentEncoder)`` for ``config`` (``latent_dim=0``: the non-latent
    decoder with :func:`lvmkit.models.empty_guide`).

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_recurrent_vae(lvmkit.RecurrentVAEConfig(data_dim=6))
        >>> x = torch.bernoulli(torch.full((4, 5, 6), 0.3))
        >>> result = lvmkit.fit(model, guide, {"x": x, "lengths": torch.tensor([5, 3, 2, 5])},
        ...                     epochs=1, batch_size=2, progress=False)
        >>> len(result.history)
        1
    """

    model = RecurrentVAE(config)
    return model, (RecurrentEncoder(config) if config.latent_dim else empty_guide)


def build_dmm(config: DMMConfig):
    """``(DeepMarkovModel, MarkovGuide)`` for ``config``.

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_dmm(lvmkit.DMMConfig(data_dim=6, latent_dim=2))
        >>> data = {"x": torch.ones(3, 4, 6), "lengths": torch.tensor([4, 2, 1])}
        >>> lvmkit.evaluate(model, guide, data, num_samples=2).shape[0]
        3
    """

    return DeepMarkovModel(config), MarkovGuide(config)


__all__ = [
    "build_autoencoder",
    "build_cvae",
    "build_dmm",
    "build_m1_m2",
    "build_m2",
    "build_nonlinear",
    "build_recurrent_vae",
    "build_vae",
]


def build_vqvae(config: VQVAEConfig) -> tuple[VQVAE, VQEncoder]:
    """A :class:`VQVAE` and the :class:`VQEncoder` that mirrors its decoder, sharing one
    codebook (the model's prior is over its vectors; the guide chooses among them).

    Example::

        >>> import lvmkit
        >>> cfg = lvmkit.VQVAEConfig(lvmkit.VAEConfig(data_dim=784, latent_dim=128), positions=8)
        >>> model, guide = lvmkit.build_vqvae(cfg)
        >>> model.codebook is guide.codebook, tuple(model.codebook.embeddings.shape)
        (True, (256, 16))
    """
    codebook = Codebook(config.num_codes, config.code_dim, ema=config.ema)
    return VQVAE(config, codebook), VQEncoder(config, codebook)


def fit_code_prior(
    model: VQVAE, guide: VQEncoder, data: Any, *, hidden: int = 128, **fit_options: Any
) -> Any:
    """Fit a :class:`~lvmkit.models.CodePrior` to the codes ``guide`` gives ``data`` (the
    paper's second stage) and attach it as the model's ``code_prior``: the model then samples
    from it, and its ELBO counts log p(c) under it instead of −L log K. ``fit_options`` go to
    :func:`lvmkit.fit` (epochs, batch_size, lr, …); returns its :class:`~lvmkit.FitResult`.

    Example::

        >>> import torch, lvmkit
        >>> cfg = lvmkit.VQVAEConfig(lvmkit.VAEConfig(data_dim=4, latent_dim=6, hidden_dims=(8,)),
        ...                          positions=3, num_codes=5)
        >>> model, guide = lvmkit.build_vqvae(cfg)
        >>> x = torch.bernoulli(torch.full((32, 4), 0.5))
        >>> result = lvmkit.fit_code_prior(model, guide, x, hidden=8, epochs=2, progress=False)
        >>> model.code_prior is not None, model(batch_size=2).shape
        (True, torch.Size([2, 4]))
    """
    from lvmkit.inference import fit
    from lvmkit.inference.calls import as_points
    from lvmkit.models import empty_guide

    codes = guide.codes(as_points(data))
    prior = CodePrior(model.config.num_codes, model.config.positions, hidden).to(codes.device)
    result = fit(prior, empty_guide, codes, **fit_options)
    model.code_prior = prior
    return result
