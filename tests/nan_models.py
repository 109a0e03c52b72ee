"""Small models that turn non-finite on purpose, for the rollback tests."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam


class Flagged(PyroModule):
    """z ~ N(0, 1), x ~ N(w z, s (1 − flag)): the flagged row has scale 0, so log p is NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.w = PyroParam(torch.tensor(1.0))
        self.s = PyroParam(torch.tensor(1.0), constraint=dist.constraints.positive)

    def forward(self, x, flag):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(self.w * z, self.s * (1 - flag)), obs=x)


class FlaggedGuide(PyroModule):
    def __init__(self) -> None:
        super().__init__()
        self.a = PyroParam(torch.tensor(0.5))

    def forward(self, x, flag):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.a * x, 0.5))


class ExpLoc(PyroModule):
    """x ~ N(exp(w), 1): a large learning rate overflows exp(w) to inf."""

    def __init__(self) -> None:
        super().__init__()
        self.w = PyroParam(torch.tensor(0.0))

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(self.w.exp(), 1.0), obs=x)


def no_guide(x):
    """ExpLoc has no latent variables."""
