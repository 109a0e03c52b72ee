"""The multilayer perceptron that decoders and encoders are built from."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import nn

from lvmkit.base import check_choice

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
}


def mlp(in_dim: int, hidden_dims: Sequence[int], out_dim: int, activation: str) -> nn.Sequential:
    """Linear layers of widths ``in_dim → *hidden_dims → out_dim`` with ``activation`` between them.

    The output layer is linear: heads (logits, means, log-variances) apply their own link.
    """
    act = ACTIVATIONS[check_choice("activation", activation, ACTIVATIONS)]
    widths = [in_dim, *hidden_dims]
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), act()]
    layers.append(nn.Linear(widths[-1], out_dim))
    return nn.Sequential(*layers)
