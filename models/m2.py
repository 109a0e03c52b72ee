"""The semi-supervised VAE "M2" of Kingma, Rezende, Mohamed & Welling (NeurIPS 2014; seed 004).

Generative model, for a label y and a style z:

    p(y) = Cat(1/C),  p(z) = N(0, I),  p(x | y, z) = Bernoulli(sigmoid(f(y, z)))

Guide (:class:`lvmkit.guides.SemiSupervisedEncoder`): q(y | x) = Cat(π(x)) — the classifier —
and q(z | x, y) = N(μ(x, y), diag σ²(x, y)).

Data (Kingma et al.'s objective over the whole data set, Σ_labelled L(x, y) + Σ_unlabelled U(x)
+ α Σ_labelled log q(y | x)): the unlabelled images are called as ``model(x)`` — y latent; the
guide marks it for parallel enumeration, so ``TraceEnum_ELBO`` sums it out exactly (Kingma's
U(x)); under the other objectives and in ``evaluate`` it is drawn from q(y | x) — and the labelled
ones as ``model(x, y)`` — y observed (Kingma's L(x, y)), weighted by ``labelled_weight`` in the
model and the guide alike. :func:`lvmkit.datasets.semi_supervised` splits a labelled data set
into the two :class:`lvmkit.Source` of one ``fit``, each passed once an epoch, so that every
image counts once per epoch, as in the paper's sums.

``aux_weight`` (α, per labelled image and pass) adds α · log q(y | x) of each labelled image,
so that the classifier also learns from the labels directly; the model holds the guide's
classifier for that term (:func:`build_m2` shares it), and adds it in training mode only.
Kingma et al. set α = 0.1 · N over the labelled images' mean, i.e. 0.1 · N / N_labelled per
labelled image (:func:`kingma_aux_weight`): 50 for 100 labels of MNIST's 50,000 images.

Called with ``x`` alone (as ``evaluate`` does), the model scores unlabelled points: ``evaluate``
then gives the ELBO and the importance-sampled log p(x) with y and z both sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn
from torch.nn import functional as F

from lvmkit.base import (
    check_bernoulli_data,
    check_choice,
    check_data_matrix,
    check_float,
    check_int,
    check_sizes,
)
from lvmkit.models.mlp import ACTIVATIONS, mlp


@dataclass(frozen=True)
class M2Config:
    """Sizes and weights of M2 (defaults: Kingma et al.'s MNIST set-up, 500 softplus units)."""

    data_dim: int
    num_classes: int = 10
    latent_dim: int = 50
    hidden_dims: tuple[int, ...] = (500,)
    activation: str = "softplus"
    labelled_weight: float = 1.0  # weight of each labelled point's L(x, y) (model and guide)
    aux_weight: float = 50.0  # α per labelled point: weight of log q(y | x) (0: no extra term)

    def __post_init__(self) -> None:
        check_int("data_dim", self.data_dim)
        check_int("num_classes", self.num_classes, minimum=2)
        check_int("latent_dim", self.latent_dim)
        object.__setattr__(self, "hidden_dims", check_sizes("hidden_dims", self.hidden_dims))
        check_choice("activation", self.activation, ACTIVATIONS)
        check_float("labelled_weight", self.labelled_weight)
        check_float("aux_weight", self.aux_weight, nonnegative=True)


def joint_input(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``cat([a, b], -1)`` after broadcasting their batch dims (enumerated or particle dims)."""
    batch = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*batch, a.shape[-1]), b.expand(*batch, b.shape[-1])], dim=-1)


class M2(PyroModule):
    """p(x, y, z) = p(y) p(z) p(x | y, z). Called with ``x=None`` it samples ``batch_size``
    images (with ``y`` given: images of those classes).

    Example::

        >>> import torch, lvmkit
        >>> model, guide = lvmkit.build_m2(lvmkit.M2Config(data_dim=4, num_classes=3,
        ...                                latent_dim=2, hidden_dims=(8,)))
        >>> model(batch_size=5).shape
        torch.Size([5, 4])
    """

    static_structure = False  # y observed or enumerated by the call; data-dependent sizes

    def __init__(self, config: M2Config, classifier: nn.Module | None = None) -> None:
        if not isinstance(config, M2Config):
            raise TypeError(f"config must be an M2Config; got {type(config).__name__}")
        super().__init__()
        self.config = config
        self.decoder = self._decoder(config.data_dim)
        self.classifier = classifier  # the guide's, for the auxiliary term (build_m2 shares it)
        self.register_buffer(
            "prior_probs", torch.full((config.num_classes,), 1 / config.num_classes)
        )
        self.register_buffer("prior_loc", torch.zeros(config.latent_dim))
        self.register_buffer("prior_scale", torch.ones(config.latent_dim))

    def _decoder(self, outputs: int) -> nn.Module:
        """f(y, z): the network from the label and the style to the likelihood's parameters."""
        cfg = self.config
        return mlp(cfg.latent_dim + cfg.num_classes, cfg.hidden_dims, outputs, cfg.activation)

    def _one_hot(self, y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y.long(), self.config.num_classes).to(self.prior_loc.dtype)

    def forward(
        self,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        batch_size: int | None = None,
    ):
        n = x.shape[0] if x is not None else (len(y) if y is not None else (batch_size or 1))
        weight = self.config.labelled_weight if y is not None and x is not None else 1.0
        with pyro.plate("data", n):
            with poutine.scale(scale=weight):
                label = pyro.sample("y", dist.Categorical(self.prior_probs), obs=y)  # batch (N,)
                z = pyro.sample(  # batch (N,) event (Dz,)
                    "z", dist.Normal(self.prior_loc, self.prior_scale).to_event(1)
                )
                out, features = self._emit(joint_input(z, self._one_hot(label)), x)
            if y is not None and x is not None and self._aux:  # α log q(y | x), unweighted
                assert self.classifier is not None
                log_q = dist.Categorical(logits=self.classifier(features)).log_prob(y.long())
                pyro.factor("classifier_log_q", self.config.aux_weight * log_q)  # batch (N,)
        return out

    def _emit(self, yz: torch.Tensor, x: torch.Tensor | None):
        """The data given (y, z) — ``yz`` their joint input — and what the classifier reads."""
        logits = self.decoder(yz)
        out = pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)
        return out, x

    @property
    def _aux(self) -> bool:
        return self.training and self.config.aux_weight > 0 and self.classifier is not None

    def validate_data(self, x=None, y=None, **_: object) -> None:
        check_data_matrix(x, self.config.data_dim, "M2", "M2Config")
        check_bernoulli_data(x)
        check_labels(self.config.num_classes, x, y)


class StackedM2(M2):
    """M1+M2 (Kingma et al. 2014, §3.2 "stacked generative semi-supervised model"):
    p(y) p(z) p(z₁ | y, z) p(x | z₁), where p(x | z₁) is the decoder of a VAE ("M1") trained
    first on all the images, and M2 models M1's latent code z₁ with a Gaussian p(z₁ | y, z) in
    place of the pixels. The M1 decoder stays as trained (it is evaluated without gradients, so no
    optimizer moves it); guide: :class:`lvmkit.guides.StackedSemiSupervisedEncoder`.

    ``config.data_dim`` is M1's latent size (the dimension of z₁); the data are the images, called
    as for :class:`M2`: ``model(x)`` unlabelled, ``model(x, y)`` labelled.

    Example::

        >>> import torch, lvmkit
        >>> m1 = lvmkit.VAE(lvmkit.VAEConfig(data_dim=4, latent_dim=3, hidden_dims=(8,)))
        >>> enc = lvmkit.GaussianEncoder(lvmkit.GaussianEncoderConfig(4, 3, (8,)))
        >>> model, guide = lvmkit.build_m1_m2(lvmkit.M2Config(data_dim=3, num_classes=2,
        ...                                   latent_dim=2, hidden_dims=(8,)), m1, enc)
        >>> model(batch_size=5).shape
        torch.Size([5, 4])
    """

    static_structure = False
    m1_decoder: Any  # M1's model: anything with likelihood(z) → p(x | z)

    def __init__(self, config: M2Config, m1_model: Any, classifier=None) -> None:
        if not callable(getattr(m1_model, "likelihood", None)):
            raise TypeError(
                "m1_model must have likelihood(z) → p(x | z) (an lvmkit.VAE does); got "
                f"{type(m1_model).__name__}"
            )
        super().__init__(config, classifier)  # p(y), p(z), the shared classifier
        self.m1_decoder = m1_model  # frozen: used under torch.no_grad

    def _decoder(self, outputs: int) -> nn.Module:
        return super()._decoder(2 * outputs)  # p(z₁ | y, z): a mean and a log-variance

    def _emit(self, yz: torch.Tensor, x: torch.Tensor | None):
        loc, log_var = self.decoder(yz).split(self.config.data_dim, -1)
        z1 = pyro.sample(  # batch (N,) event (D₁,): M1's code
            "z1", dist.Normal(loc, torch.exp(0.5 * log_var)).to_event(1)
        )
        with torch.no_grad():  # M1's decoder is not trained here
            likelihood = self.m1_decoder.likelihood(z1)
        return pyro.sample("x", likelihood, obs=x), z1  # batch (N,) event (Dx,); q(y | z₁)

    def validate_data(self, x=None, y=None, **_: object) -> None:
        check = getattr(self.m1_decoder, "validate_data", None)
        if callable(check):  # the images are M1's data: M1 knows their shape and range
            check(x)
        elif not isinstance(x, torch.Tensor):
            raise ValueError(f"data must provide the images 'x' for StackedM2; got {x!r}")
        check_labels(self.config.num_classes, x, y)


def check_labels(num_classes: int, x: torch.Tensor, y) -> None:
    """``y``, when given, one label in 0..C − 1 per image of ``x``."""
    if y is None:
        return
    if y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1:
        raise ValueError(
            "data 'y' must be a 1-D integer tensor of class labels; got "
            f"{y.dtype} of shape {tuple(y.shape)}"
        )
    if len(y) != len(x):
        raise ValueError(
            f"data 'y' must hold one label per image: {len(x)} images, {len(y)} labels"
        )
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"data 'y' must hold labels in 0..{num_classes - 1} "
            f"(M2Config.num_classes={num_classes}); got values in "
            f"[{int(y.min())}, {int(y.max())}]"
        )


def kingma_aux_weight(num_points: int, num_labelled: int) -> float:
    """Kingma et al.'s α per labelled image: α = 0.1 · N weighs the labelled images' *mean*
    −log q(y | x) against the whole data set's bound, i.e. 0.1 · N / N_labelled per image.

    Example::

        >>> kingma_aux_weight(50_000, 100)
        50.0
    """
    check_int("num_points", num_points)
    check_int("num_labelled", num_labelled)
    return 0.1 * num_points / num_labelled
