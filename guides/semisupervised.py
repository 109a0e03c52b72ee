"""M2's guide: the classifier q(y | x) and the style encoder q(z | x, y)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch.nn import functional as F

from lvmkit.models.m2 import M2Config, joint_input
from lvmkit.models.mlp import mlp


class SemiSupervisedEncoder(PyroModule):
    """q(y | x) q(z | x, y) for :class:`lvmkit.models.M2`, with its signature.

    For unlabelled points (called with ``x``) y is marked for parallel enumeration: with
    ``TraceEnum_ELBO`` the loss sums over the C classes weighted by q(y | x) (Kingma et al.'s
    U(x), entropy of q(y | x) included); other objectives draw it. Labelled points (called with
    ``x, y``) get q(z | x, y) at their label, weighted by ``labelled_weight`` as in the model:
    the weight must scale the guide's terms too, or ``labelled_weight · log p − log q`` is no
    bound and has no maximum.
    """

    static_structure = False

    def __init__(self, config: M2Config) -> None:
        if not isinstance(config, M2Config):
            raise TypeError(f"config must be an M2Config; got {type(config).__name__}")
        super().__init__()
        self.config = config
        h, act = config.hidden_dims, config.activation
        self.classifier = mlp(config.data_dim, h, config.num_classes, act)
        self.encoder = mlp(config.data_dim + config.num_classes, h, 2 * config.latent_dim, act)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable class under q(y | x), shape ``(N,)``."""
        return self.classifier(x).argmax(dim=-1)

    def _z(self, x: torch.Tensor, y: torch.Tensor, name: str):
        one_hot = F.one_hot(y.long(), self.config.num_classes).to(x.dtype)
        loc, log_var = self.encoder(joint_input(x, one_hot)).split(self.config.latent_dim, -1)
        return pyro.sample(name, dist.Normal(loc, torch.exp(0.5 * log_var)).to_event(1))

    def forward(self, x=None, y=None, *, batch_size=None):
        if x is None:
            raise ValueError(f"{type(self).__name__} needs data: x (and y for labelled images)")
        weight = self.config.labelled_weight if y is not None else 1.0  # as the model's
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=weight):
            self._y_and_z(self._inputs(x), y)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What q(y | ·) and q(z | ·, y) read: the images themselves."""
        return x

    def _y_and_z(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        label = y
        if label is None:
            label = pyro.sample(  # batch (N,)
                "y",
                dist.Categorical(logits=self.classifier(x)),
                infer={"enumerate": "parallel"},
            )
        self._z(x, label, "z")  # batch (N,) event (Dz,)


class StackedSemiSupervisedEncoder(SemiSupervisedEncoder):
    """Guide of :class:`lvmkit.models.StackedM2` (M1+M2): z₁ ~ q(z₁ | x) from the trained M1
    encoder (not trained further), then M2's q(y | z₁) q(z | z₁, y) on that code. ``classify``
    reads M1's posterior mean, as Kingma et al. classify with M1's features."""

    def __init__(self, config: M2Config, m1_guide) -> None:
        if not callable(getattr(m1_guide, "encode", None)):
            raise TypeError(
                "m1_guide must have encode(x) → (loc, scale) (an lvmkit.GaussianEncoder does); "
                f"got {type(m1_guide).__name__}"
            )
        super().__init__(config)
        self.m1_encoder = m1_guide  # frozen: used under torch.no_grad

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """M1's posterior mean of z₁ for the images ``x``, shape ``(N, D₁)``."""
        with torch.no_grad():
            return self.m1_encoder.encode(x)[0]

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)).argmax(dim=-1)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # M1's encoder is not trained here
            loc, scale = self.m1_encoder.encode(x)
        return pyro.sample("z1", dist.Normal(loc, scale).to_event(1))  # batch (N,) event (D₁,)
