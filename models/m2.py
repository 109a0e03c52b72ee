"""The semi-supervised VAE "M2" of Kingma, Rezende, Mohamed & Welling (NeurIPS 2014; seed 004).

Generative model, for a label y and a style z:

    p(y) = Cat(1/C),  p(z) = N(0, I),  p(x | y, z) = Bernoulli(sigmoid(f(y, z)))

Guide (:class:`lvmkit.guides.SemiSupervisedEncoder`): q(y | x) = Cat(π(x)) — the classifier —
and q(z | x, y) = N(μ(x, y), diag σ²(x, y)).

Data are a dict of equal-length tensors (:func:`lvmkit.datasets.semi_supervised` builds it):
``x`` the unlabelled images, and ``xl``, ``yl`` labelled images and their labels, cycled to the
length of ``x`` so that every minibatch holds as many labelled as unlabelled points. In the plate
``"data"`` y is latent — the guide marks it for parallel enumeration, so ``TraceEnum_ELBO`` sums
it out exactly (Kingma's U(x)); under the other objectives and in ``evaluate`` it is drawn from
q(y | x). In the plate ``"labelled"`` y is observed (Kingma's L(x, y)), weighted by
``labelled_weight``. ``aux_weight`` (Kingma's α) adds α · log q(y | x) of the labelled points, so
that the classifier also learns from the labels directly; the model holds the guide's classifier
for that term (:func:`build_m2` shares it), and adds it in training mode only.

Called with ``x`` alone (as ``evaluate`` does), the model scores unlabelled points: ``evaluate``
then gives the ELBO and the importance-sampled log p(x) with y and z both sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
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
    labelled_weight: float = 1.0  # weight of the labelled points' L(x, y) in each minibatch
    aux_weight: float = 50.0  # α: weight of log q(y | x) on labelled points (0: no extra term)

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

    static_structure = False  # enumerated and labelled plates vary; data-dependent sizes

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

    def _sites(self, x, y, suffix: str = ""):
        """y, z and x of one plate's points (sites named with ``suffix``)."""
        label = pyro.sample("y" + suffix, dist.Categorical(self.prior_probs), obs=y)  # batch (N,)
        z = pyro.sample(  # batch (N,) event (Dz,)
            "z" + suffix, dist.Normal(self.prior_loc, self.prior_scale).to_event(1)
        )
        logits = self.decoder(joint_input(z, self._one_hot(label)))
        return pyro.sample("x" + suffix, dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def forward(
        self,
        x: torch.Tensor | None = None,
        xl: torch.Tensor | None = None,
        yl: torch.Tensor | None = None,
        *,
        y: torch.Tensor | None = None,
        batch_size: int | None = None,
    ):
        n = x.shape[0] if x is not None else (len(y) if y is not None else (batch_size or 1))
        with pyro.plate("data", n):
            out = self._sites(x, y)  # unlabelled unless y is given: y latent
        if xl is not None:
            if yl is None:
                raise ValueError("labelled images xl need their labels yl")
            scale = pyro.poutine.scale(scale=self.config.labelled_weight)
            with scale, pyro.plate("labelled", xl.shape[0]):
                self._sites(xl, yl, "_labelled")
                if self.training and self.config.aux_weight > 0 and self.classifier is not None:
                    log_q = dist.Categorical(logits=self.classifier(xl)).log_prob(yl.long())
                    pyro.factor("classifier_log_q", self.config.aux_weight * log_q)  # batch (Nl,)
        return out

    def validate_data(self, x=None, xl=None, yl=None, y=None, **_: object) -> None:
        cfg = self.config
        check_data_matrix(x, cfg.data_dim, "M2", "M2Config")
        check_bernoulli_data(x)
        if xl is not None:
            check_data_matrix(xl, cfg.data_dim, "M2", "M2Config", key="xl")
            check_bernoulli_data(xl, "xl")
        if (xl is None) != (yl is None):
            raise ValueError(
                "data must give both 'xl' and 'yl' (labelled images and labels), or neither"
            )
        for key, labels in (("yl", yl), ("y", y)):
            if labels is None:
                continue
            if labels.is_floating_point() or labels.dtype == torch.bool or labels.dim() != 1:
                raise ValueError(
                    f"data {key!r} must be a 1-D integer tensor of class labels; got "
                    f"{labels.dtype} of shape {tuple(labels.shape)}"
                )
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes):
                raise ValueError(
                    f"data {key!r} must hold labels in 0..{cfg.num_classes - 1} "
                    f"(M2Config.num_classes={cfg.num_classes}); got values in "
                    f"[{int(labels.min())}, {int(labels.max())}]"
                )


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
