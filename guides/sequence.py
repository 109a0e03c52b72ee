"""Guides of the sequence models: a bidirectional GRU encoder q(z | x) for the recurrent VAE and
the reversed-sequence GRU with a combiner for the deep Markov model (see
:mod:`lvmkit.models.sequence`). Both read only the frames within each sequence's length: the
GRUs run on packed sequences, so padding never reaches the codes."""

from __future__ import annotations

from typing import cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lvmkit.models.sequence import (
    DMMConfig,
    FrameInput,
    RecurrentVAEConfig,
    sequence_mask,
    trim,
)


class RecurrentEncoder(PyroModule):
    """q(z | x) = N(μ, diag σ²) from the last states of a bidirectional GRU over x (SentenceVAE's
    encoder), for the site ``"z"`` of :class:`lvmkit.RecurrentVAE`.

    Example::

        >>> import torch, lvmkit
        >>> cfg = lvmkit.RecurrentVAEConfig(data_dim=6, latent_dim=2, hidden_dim=8, embed_dim=4)
        >>> guide = lvmkit.RecurrentEncoder(cfg)
        >>> loc, scale = guide.encode(torch.ones(3, 5, 6), torch.tensor([5, 2, 1]))
        >>> loc.shape
        torch.Size([3, 2])
    """

    def __init__(self, config: RecurrentVAEConfig) -> None:
        if not isinstance(config, RecurrentVAEConfig):
            raise TypeError(f"config must be a RecurrentVAEConfig; got {type(config).__name__}")
        if config.latent_dim == 0:
            raise ValueError("a RecurrentVAEConfig with latent_dim=0 has no code to encode")
        super().__init__()
        self.config = config
        self.encoder_inputs = FrameInput(config)
        self.encoder_rnn = nn.GRU(
            config.embed_dim, config.hidden_dim, batch_first=True, bidirectional=True
        )
        self.encoder_head = nn.Linear(2 * config.hidden_dim, 2 * config.latent_dim)

    def encode(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's ``(loc, scale)``, each (N, latent_dim)."""
        packed = pack_padded_sequence(
            self.encoder_inputs(x), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        _, last = self.encoder_rnn(
            packed
        )  # (2, N, H): the forward and the backward direction's end
        loc, raw = self.encoder_head(torch.cat([last[0], last[1]], dim=-1)).chunk(2, dim=-1)
        return loc, F.softplus(raw) + 1e-4

    def forward(
        self,
        x: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        *,
        length: int | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        if x is None:
            raise ValueError("RecurrentEncoder needs data: call guide(x, lengths)")
        x, lengths = trim(x, lengths)
        loc, scale = self.encode(x, lengths)
        with pyro.plate("sequences", x.shape[0]):
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))


class MarkovGuide(PyroModule):
    """Krishnan et al.'s structured guide for :class:`lvmkit.DeepMarkovModel`:
    q(z_t | z_{t−1}, x_{t:T}) = N(μ, σ) from h_t = ½ (tanh(W z_{t−1}) + g_t), with g_t the state
    of a GRU run over the sequence backwards (from its last frame within its length).

    Example::

        >>> import torch, lvmkit
        >>> guide = lvmkit.MarkovGuide(lvmkit.DMMConfig(data_dim=6, latent_dim=2, rnn_dim=8))
        >>> guide.backward_states(torch.ones(3, 4, 6), torch.tensor([4, 2, 1])).shape
        torch.Size([3, 4, 8])
    """

    def __init__(self, config: DMMConfig) -> None:
        if not isinstance(config, DMMConfig):
            raise TypeError(f"config must be a DMMConfig; got {type(config).__name__}")
        super().__init__()
        self.config = config
        self.guide_rnn = nn.GRU(config.data_dim, config.rnn_dim, batch_first=True)
        self.combiner_z = nn.Linear(config.latent_dim, config.rnn_dim)
        self.combiner_loc = nn.Linear(config.rnn_dim, config.latent_dim)
        self.combiner_scale = nn.Linear(config.rnn_dim, config.latent_dim)
        self.z_q_0 = nn.Parameter(torch.zeros(config.latent_dim))
        self.guide_h_0 = nn.Parameter(torch.zeros(config.rnn_dim))

    def backward_states(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """g_t for every frame t, (N, T, H): the GRU's state after reading x_T … x_t."""
        frames = x.shape[1]
        t = torch.arange(frames, device=x.device)
        # reverse each sequence within its own length: frame t of the reversed is L − 1 − t
        index = (lengths[:, None] - 1 - t).clamp(min=0)
        reversed_x = x.gather(1, index[..., None].expand_as(x))
        packed = pack_padded_sequence(
            reversed_x, lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        h0 = self.guide_h_0.expand(1, x.shape[0], -1).contiguous()
        out, _ = self.guide_rnn(packed, h0)
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=frames)
        return states.gather(1, index[..., None].expand(-1, -1, states.shape[-1]))

    def forward(
        self,
        x: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        *,
        length: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        if x is None:
            raise ValueError("MarkovGuide needs data: call guide(x, lengths)")
        x, lengths = trim(x, lengths)
        states = self.backward_states(x, lengths)
        mask = sequence_mask(lengths, x.shape[1])
        with pyro.plate("sequences", x.shape[0]):
            z = self.z_q_0.expand(x.shape[0], -1)
            for t in pyro.markov(range(x.shape[1])):
                h = 0.5 * (torch.tanh(self.combiner_z(z)) + states[:, t])
                q = dist.Normal(
                    self.combiner_loc(h), F.softplus(self.combiner_scale(h)) + 1e-4
                ).to_event(1)
                with poutine.mask(mask=cast(torch.BoolTensor, mask[:, t])):
                    z = pyro.sample(f"z_{t + 1}", q)
