"""Amortized guides q(z | x): one family per file."""

from lvmkit.guides.categorical import CategoricalEncoder, CategoricalEncoderConfig
from lvmkit.guides.conditional import ConditionalEncoder
from lvmkit.guides.deterministic import DeterministicEncoder
from lvmkit.guides.flow import IAFEncoder
from lvmkit.guides.gaussian import GaussianEncoder, GaussianEncoderConfig
from lvmkit.guides.hamiltonian import HamiltonianEncoder, HamiltonianFlow
from lvmkit.guides.semisupervised import SemiSupervisedEncoder, StackedSemiSupervisedEncoder
from lvmkit.guides.sequence import MarkovGuide, RecurrentEncoder
from lvmkit.guides.vq import CodebookUsage, VQEncoder

__all__ = [
    "CategoricalEncoder",
    "CategoricalEncoderConfig",
    "CodebookUsage",
    "ConditionalEncoder",
    "DeterministicEncoder",
    "GaussianEncoder",
    "GaussianEncoderConfig",
    "HamiltonianEncoder",
    "HamiltonianFlow",
    "IAFEncoder",
    "MarkovGuide",
    "RecurrentEncoder",
    "SemiSupervisedEncoder",
    "StackedSemiSupervisedEncoder",
    "VQEncoder",
]
