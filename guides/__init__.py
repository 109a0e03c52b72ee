"""Amortized guides q(z | x): one family per file."""

from lvmkit.guides.gaussian import GaussianEncoder, GaussianEncoderConfig

__all__ = ["GaussianEncoder", "GaussianEncoderConfig"]
