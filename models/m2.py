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

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn
from torch.nn import functional as F

from lvmkit.models._checks import (
    check_bernoulli_data,
    check_choice,
    check_data_matrix,
    check_float,
    check_int,
    check_sizes,
)
from lvmkit.models._mlp import ACTIVATIONS, mlp


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
        self.decoder = mlp(
            config.latent_dim + config.num_classes,
            config.hidden_dims,
            config.data_dim,
            config.activation,
        )
        self.classifier = classifier  # the guide's, for the auxiliary term (build_m2 shares it)
        self.register_buffer(
            "prior_probs", torch.full((config.num_classes,), 1 / config.num_classes)
        )
        self.register_buffer("prior_loc", torch.zeros(config.latent_dim))
        self.register_buffer("prior_scale", torch.ones(config.latent_dim))

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
                logits = self.decoder(joint_input(z, self._one_hot(label)))
                out = pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)
            if y is not None and x is not None and self._aux:  # α log q(y | x), unweighted
                assert self.classifier is not None
                log_q = dist.Categorical(logits=self.classifier(x)).log_prob(y.long())
                pyro.factor("classifier_log_q", self.config.aux_weight * log_q)  # batch (N,)
        return out

    @property
    def _aux(self) -> bool:
        return self.training and self.config.aux_weight > 0 and self.classifier is not None

    def validate_data(self, x=None, y=None, **_: object) -> None:
        cfg = self.config
        check_data_matrix(x, cfg.data_dim, "M2", "M2Config")
        check_bernoulli_data(x)
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
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= cfg.num_classes):
            raise ValueError(
                f"data 'y' must hold labels in 0..{cfg.num_classes - 1} "
                f"(M2Config.num_classes={cfg.num_classes}); got values in "
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
    from lvmkit.guides.semisupervised import SemiSupervisedEncoder

    guide = SemiSupervisedEncoder(config)
    return M2(config, classifier=guide.classifier), guide
