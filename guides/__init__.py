"""Amortized guides q(z | x): one family per file."""

from lvmkit.guides.categorical import CategoricalEncoder, CategoricalEncoderConfig
from lvmkit.guides.gaussian import GaussianEncoder, GaussianEncoderConfig

__all__ = [
    "CategoricalEncoder",
    "CategoricalEncoderConfig",
    "GaussianEncoder",
    "GaussianEncoderConfig",
]
