"""VQ-VAE (van den Oord, Vinyals & Kavukcuoglu, "Neural Discrete Representation Learning", NeurIPS
2017) as a Pyro model: a discrete code, a codebook, the VAE's decoder.

Each data point has L code positions; each position takes one of K codebook vectors e_1 … e_K
(of dimension D). The generative model is

    c_l ~ p(c)  (uniform over the K codes, or a learned prior),   z_l = e_{c_l},   x ~ p(x | z)

with the decoder and likelihoods of :class:`lvmkit.VAE`. The guide
(:class:`lvmkit.guides.VQEncoder`) is a point mass on the nearest codes of an encoder's output
z_e(x), so log q = 0 and the ELBO is

    log p(x | e_c(x)) + log p(c(x))  =  log p(x | e_c(x)) − L log K   (uniform prior),

an honest lower bound on log p(x) that ``evaluate`` reports (importance sampling cannot improve it:
every draw of a point mass is the same). The latent site ``"z"`` carries the *vectors* e_c, so the
decoder's gradient reaches the encoder by the straight-through estimator
(z = z_e + sg[e_c − z_e]: the value of e_c, the gradient of z_e); :class:`CodebookPrior` scores a
value as a code only where it is one (within rounding), −∞ elsewhere.

Training adds the paper's two terms, β‖z_e − sg[e]‖² (commitment) and ‖sg[z_e] − e‖² (codebook),
as a factor of the guide; with ``ema=True`` the codebook follows exponential moving averages of
the encoder outputs assigned to each code instead (the paper's appendix; decay 0.99) and only the
commitment term is a loss. :class:`CodePrior`, an autoregressive network over the code positions
fitted after the autoencoder (the paper fits a PixelCNN over its 2-D code maps; codes of an MLP
lie in a line, so a GRU), makes samples and tightens the bound when attached as the model's
``code_prior``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule
from torch import nn

from lvmkit.base import check_bernoulli_data, check_data_matrix, check_float, check_int
from lvmkit.models.mlp import mlp
from lvmkit.models.vae import VAEConfig, decoder_likelihood, num_points_of


@dataclass(frozen=True)
class VQVAEConfig:
    """A VQ-VAE: the network sizes and likelihood of a :class:`lvmkit.VAEConfig` (``vae``; its
    ``latent_dim`` is the encoder's output, L × D), the code layout and the codebook's training.
    """

    vae: VAEConfig  # decoder / encoder sizes, the likelihood; latent_dim = positions × code_dim
    positions: int = 8  # L: codes per data point
    num_codes: int = 256  # K: codebook size (pythae's MNIST configuration)
    beta: float = 0.25  # commitment weight (the paper's; robust for 0.1-2.0)
    ema: bool = False  # the codebook by exponential moving averages instead of its loss
    decay: float = 0.99  # of the moving averages
    epsilon: float = 1e-5  # Laplace smoothing of the moving counts

    def __post_init__(self) -> None:
        if not isinstance(self.vae, VAEConfig):
            raise TypeError(f"vae must be a VAEConfig; got {type(self.vae).__name__}")
        check_int("positions", self.positions)
        check_int("num_codes", self.num_codes, minimum=2)
        if self.vae.latent_dim % self.positions:
            raise ValueError(
                f"vae.latent_dim ({self.vae.latent_dim}) must be a multiple of positions "
                f"({self.positions}): each position gets latent_dim / positions dimensions"
            )
        check_float("beta", self.beta, nonnegative=True)
        if not isinstance(self.ema, bool):
            raise TypeError(f"ema must be True or False; got {self.ema!r}")
        decay = check_float("decay", self.decay)
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1); got {decay}")
        check_float("epsilon", self.epsilon)

    @property
    def code_dim(self) -> int:
        """D: the dimension of each codebook vector."""
        return self.vae.latent_dim // self.positions


class Codebook(nn.Module):
    """K vectors of dimension D: a parameter trained by the codebook loss, or (``ema``) buffers
    that follow moving averages of the encoder outputs assigned to each code."""

    embeddings: torch.Tensor
    cluster_size: torch.Tensor
    embed_sum: torch.Tensor
    staged_counts: torch.Tensor
    staged_sums: torch.Tensor

    def __init__(self, num_codes: int, code_dim: int, *, ema: bool = False) -> None:
        super().__init__()
        self.ema = ema
        if ema:
            initial = torch.randn(num_codes, code_dim)
            self.register_buffer("embeddings", initial)
            self.register_buffer("cluster_size", torch.ones(num_codes))
            self.register_buffer("embed_sum", initial.clone())
            # a training pass's assignments, applied at the start of the next one (see stage)
            self.register_buffer("staged_counts", torch.zeros(num_codes))
            self.register_buffer("staged_sums", torch.zeros(num_codes, code_dim))
        else:
            bound = 1 / num_codes
            self.embeddings = nn.Parameter(torch.empty(num_codes, code_dim).uniform_(-bound, bound))

    @property
    def num_codes(self) -> int:
        return int(self.embeddings.shape[0])

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """‖z − e_k‖² for every code: ``(..., D)`` → ``(..., K)``."""
        e = self.embeddings
        return (z * z).sum(-1, keepdim=True) - 2 * z @ e.T + (e * e).sum(-1)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """The index of the nearest code of each vector, ``(..., D)`` → ``(...)``."""
        return self.distances(z).argmin(-1)

    @torch.no_grad()
    def stage(self, z_e: torch.Tensor, codes: torch.Tensor) -> None:
        """Keep a training pass's encoder outputs ``z_e`` (``(..., D)``) and their codes
        (``(...)``) as counts and sums per code, for :meth:`apply_staged`. The codebook does not
        move within the pass: the model's prior, later in the same step, must find the codes the
        guide chose. Buffers, so a checkpoint holds them and a resumed run is exact."""
        flat, index = z_e.reshape(-1, z_e.shape[-1]), codes.reshape(-1)
        onehot = torch.zeros(index.numel(), self.num_codes, device=flat.device, dtype=flat.dtype)
        onehot.scatter_(1, index[:, None], 1.0)
        self.staged_counts.copy_(onehot.sum(0))
        self.staged_sums.copy_(onehot.T @ flat)

    @torch.no_grad()
    def apply_staged(self, decay: float, eps: float) -> None:
        """One moving-average step towards the staged assignments (none staged: nothing): counts
        and sums decay by ``decay``; each code becomes its smoothed sum over its smoothed count."""
        staged = self.staged_counts.sum() > 0  # (on the device: no host read)
        size = decay * self.cluster_size + (1 - decay) * self.staged_counts
        summed = decay * self.embed_sum + (1 - decay) * self.staged_sums
        total = size.sum()
        smoothed = (size + eps) / (total + self.num_codes * eps) * total
        self.embeddings.copy_(torch.where(staged, summed / smoothed[:, None], self.embeddings))
        self.cluster_size.copy_(torch.where(staged, size, self.cluster_size))
        self.embed_sum.copy_(torch.where(staged, summed, self.embed_sum))
        self.staged_counts.zero_()
        self.staged_sums.zero_()


class CodebookPrior(dist.TorchDistribution):
    """The prior over ``z`` of a VQ-VAE: L positions, each one of the codebook's vectors,
    uniform (log p = −L log K) or under a learned :class:`CodePrior` over the codes. A value
    that is not made of codebook vectors (beyond rounding) has log-density −∞.
    Event shape ``(L, D)``."""

    arg_constraints: ClassVar[dict] = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = False
    TOLERANCE = 1e-6  # squared distance to a code, relative to 1 + its squared norm

    def __init__(
        self,
        codebook: Codebook,
        positions: int,
        code_prior: CodePrior | None = None,
        batch_shape: torch.Size | tuple[int, ...] = (),
        validate_args: bool | None = None,
    ) -> None:
        self.codebook, self.positions, self.code_prior = codebook, positions, code_prior
        event = torch.Size((positions, codebook.embeddings.shape[1]))
        super().__init__(torch.Size(batch_shape), event, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> CodebookPrior:
        return CodebookPrior(self.codebook, self.positions, self.code_prior, batch_shape)

    def codes(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The code index at each position of ``value`` and whether every position is a code."""
        squared = self.codebook.distances(value)  # (..., L, K)
        best, index = squared.min(-1)
        norm = (self.codebook.embeddings**2).sum(-1)[index]
        member = (best <= self.TOLERANCE * (1 + norm)).all(-1)
        return index, member

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        index, member = self.codes(value)
        if self.code_prior is None:
            lp = torch.full_like(member, -self.positions * math.log(self.codebook.num_codes),
                                 dtype=value.dtype)  # fmt: skip
        else:
            lp = self.code_prior.log_prob(index)
        return torch.where(member, lp, torch.full_like(lp, -math.inf))

    def sample(self, sample_shape=()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            if self.code_prior is None:
                device = self.codebook.embeddings.device
                index = torch.randint(self.codebook.num_codes, (*shape, self.positions),
                                      device=device)  # fmt: skip
            else:
                index = self.code_prior.sample_codes(shape.numel()).reshape(*shape, -1)
            return self.codebook.embeddings[index]


class CodePrior(PyroModule):
    """p(c_1 … c_L) = Π_l p(c_l | c_<l): a GRU over the code positions (teacher-forced), the
    learned prior a VQ-VAE samples from. As a Pyro model it scores observed codes (``codes``:
    ``(N, L)`` integers; pair it with an empty guide and ``fit`` it), and
    :meth:`sample_codes` draws new ones.

    Example::

        >>> import torch, lvmkit
        >>> prior = lvmkit.models.CodePrior(num_codes=5, positions=3, hidden=8)
        >>> prior.log_prob(torch.zeros(2, 3, dtype=torch.long)).shape
        torch.Size([2])
        >>> prior.sample_codes(4).shape
        torch.Size([4, 3])
    """

    static_structure = True

    def __init__(self, num_codes: int, positions: int, hidden: int = 128) -> None:
        super().__init__()
        self.num_codes = check_int("num_codes", num_codes, minimum=2)
        self.positions = check_int("positions", positions)
        check_int("hidden", hidden)
        self.embed = nn.Embedding(num_codes + 1, hidden)  # index num_codes: the start token
        self.rnn = nn.GRU(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, num_codes)

    def logits(self, codes: torch.Tensor) -> torch.Tensor:
        """log p(c_l = k | c_<l) up to a constant, ``(..., L)`` → ``(..., L, K)``."""
        batch = codes.shape[:-1]
        flat = codes.reshape(-1, self.positions)
        start = torch.full_like(flat[:, :1], self.num_codes)
        hidden, _ = self.rnn(self.embed(torch.cat([start, flat[:, :-1]], dim=1)))
        return self.out(hidden).reshape(*batch, self.positions, self.num_codes)

    def log_prob(self, codes: torch.Tensor) -> torch.Tensor:
        """log p(c) per sequence of codes, ``(..., L)`` → ``(...)``."""
        return dist.Categorical(logits=self.logits(codes)).log_prob(codes).sum(-1)

    def forward(self, codes: torch.Tensor) -> None:
        with pyro.plate("data", codes.shape[0]):
            pyro.sample("codes", dist.Categorical(logits=self.logits(codes)).to_event(1), obs=codes)

    @torch.no_grad()
    def sample_codes(self, n: int) -> torch.Tensor:
        """``n`` sequences of codes drawn position by position, ``(n, L)``."""
        device = self.out.weight.device
        token = torch.full((n, 1), self.num_codes, dtype=torch.long, device=device)
        state, out = None, []
        for _ in range(self.positions):
            hidden, state = self.rnn(self.embed(token), state)
            token = dist.Categorical(logits=self.out(hidden[:, -1])).sample()[:, None]
            out.append(token)
        return torch.cat(out, dim=1)


class VQVAE(PyroModule):
    """The VQ-VAE's generative model (see the module docstring): codes from the uniform prior
    (or ``code_prior``, once fitted), their codebook vectors decoded by the VAE's decoder.

    Example::

        >>> import lvmkit
        >>> cfg = lvmkit.VQVAEConfig(lvmkit.VAEConfig(data_dim=4, latent_dim=6, hidden_dims=(8,)),
        ...                          positions=3, num_codes=5)
        >>> model, guide = lvmkit.build_vqvae(cfg)
        >>> model(batch_size=2).shape
        torch.Size([2, 4])

    References: van den Oord, Vinyals & Kavukcuoglu, "Neural Discrete Representation Learning",
    NeurIPS 2017.
    """

    def __init__(self, config: VQVAEConfig, codebook: Codebook | None = None) -> None:
        if not isinstance(config, VQVAEConfig):
            raise TypeError(f"config must be a VQVAEConfig; got {type(config).__name__}")
        super().__init__()
        self.config = config
        self.static_structure = not config.ema  # the moving averages write buffers in place
        v = config.vae
        heads = 2 if v.likelihood == "gaussian" else 1
        self.decoder = mlp(v.latent_dim, v.hidden_dims, heads * v.data_dim, v.activation)
        self.codebook = codebook or Codebook(config.num_codes, config.code_dim, ema=config.ema)
        self.code_prior: CodePrior | None = None

    def prior(self) -> CodebookPrior:
        return CodebookPrior(self.codebook, self.config.positions, self.code_prior)

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None):
        n = num_points_of(x, batch_size)
        with pyro.plate("data", n):
            z = pyro.sample("z", self.prior())  # batch (N,) event (L, D)
            return pyro.sample("x", self.likelihood(z), obs=x)  # batch (N,) event (Dx,)

    def likelihood(self, z: torch.Tensor) -> dist.TorchDistribution:
        """p(x | z) for codebook vectors ``z`` of shape ``(..., L, D)``."""
        return decoder_likelihood(self.decoder(z.flatten(-2)), self.config.vae)

    def validate_data(self, x: torch.Tensor | None = None, **_: object) -> None:
        """Raise ``ValueError`` when ``x`` cannot be scored by this model (called by ``fit``)."""
        check_data_matrix(x, self.config.vae.data_dim, "VQVAE", "VQVAEConfig.vae")
        assert x is not None
        if self.config.vae.likelihood == "bernoulli":
            check_bernoulli_data(x)


__all__ = ["VQVAE", "CodePrior", "Codebook", "CodebookPrior", "VQVAEConfig"]
