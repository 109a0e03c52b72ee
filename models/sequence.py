"""Sequence models of the seeds' VAE tutorial (002): a recurrent VAE and a deep Markov model.

Both take a minibatch of padded sequences ``x`` — (N, T, D) 0/1 frames (piano rolls, Bernoulli
emissions) or (N, T) tokens (categorical) — with ``lengths`` (N,) frames per sequence; frames past
a sequence's length are masked out of the likelihood (their values never matter), and a minibatch
is cut to its longest sequence. Called with ``x=None`` they draw ``batch_size`` new sequences of
``length`` frames by ancestral sampling and return them.

**Recurrent VAE** (:class:`RecurrentVAE`; SentenceVAE, Bowman et al., CoNLL 2016; MusicVAE,
Roberts et al., ICML 2018): one code per sequence,

    z ~ N(0, I),   h_0 = tanh(W z),   h_t = GRU(h_{t−1}, e(x_{t−1})),   x_t ~ p(x_t | h_t),

an autoregressive decoder fed the previous frame (teacher forcing in training). Against posterior
collapse — the decoder modelling the data alone and z left unused — Bowman et al. anneal the KL
weight (``fit(kl_schedule=KLSchedule(warmup_epochs=...))``) and drop decoder inputs ("word
dropout": ``frame_dropout``, each previous frame replaced by an "unknown" input with that
probability in training). ``bar_length`` gives MusicVAE's hierarchical decoder: a conductor GRU
turns z into one embedding c_u per bar of ``bar_length`` frames, and each bar's frames are decoded
from c_u alone (the bar decoder starts from tanh(W c_u) and sees c_u at every frame), so the
decoder cannot carry the whole sequence through its own state. ``latent_dim=0`` is the same
decoder with no code — the non-latent recurrent baseline (pair it with :func:`empty_guide`).

**Deep Markov model** (:class:`DeepMarkovModel`; Krishnan, Shalit & Sontag, AAAI 2017): a latent
state per frame,

    z_t ~ N(μ(z_{t−1}), σ(z_{t−1})),   x_t ~ Bernoulli(f(z_t)),

with Krishnan's gated transition (a gate mixes a linear and a nonlinear proposal for the mean);
its guide (:class:`lvmkit.guides.MarkovGuide`) runs a GRU over the reversed sequence, so that
q(z_t | z_{t−1}, x_{t:T}) sees the frames to come, and combines its state with z_{t−1}. The
time loop is ``pyro.markov`` and the padded frames are masked with ``poutine.mask``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn
from torch.nn import functional as F

from lvmkit.base import check_choice, check_float, check_int

SEQUENCE_LIKELIHOODS = ("bernoulli", "categorical")


@dataclass(frozen=True)
class RecurrentVAEConfig:
    """Sizes and options of a :class:`RecurrentVAE` and its :class:`RecurrentEncoder`.

    ``data_dim``: keys per frame (``"bernoulli"``, 88 for piano rolls) or the vocabulary size
    (``"categorical"`` tokens). ``latent_dim=0``: no code (the non-latent baseline).
    """

    data_dim: int
    likelihood: str = "bernoulli"  # one of SEQUENCE_LIKELIHOODS
    latent_dim: int = 16
    hidden_dim: int = 128  # GRU units (decoder, conductor, and each encoder direction)
    embed_dim: int = 64  # a frame's (or token's) input vector
    frame_dropout: float = 0.0  # P(a decoder input is replaced by "unknown") in training
    bar_length: int | None = None  # frames per bar: MusicVAE's conductor decoder; None: flat

    def __post_init__(self) -> None:
        check_int("data_dim", self.data_dim)
        check_choice("likelihood", self.likelihood, SEQUENCE_LIKELIHOODS)
        check_int("latent_dim", self.latent_dim, minimum=0)
        check_int("hidden_dim", self.hidden_dim)
        check_int("embed_dim", self.embed_dim)
        dropout = check_float("frame_dropout", self.frame_dropout, nonnegative=True)
        if dropout >= 1:
            raise ValueError(f"frame_dropout must be in [0, 1); got {dropout}")
        if self.bar_length is not None:
            check_int("bar_length", self.bar_length)
            if self.latent_dim == 0:
                raise ValueError("bar_length (the conductor) needs a code: latent_dim >= 1")


def sequence_mask(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """(N, T) booleans: True for the frames within each sequence's length."""
    return torch.arange(frames, device=lengths.device) < lengths[:, None]


def check_sequences(
    x: torch.Tensor | None, lengths: torch.Tensor | None, data_dim: int, likelihood: str, owner: str
) -> None:
    """Raise ``ValueError`` naming what is wrong with a minibatch of padded sequences."""
    if x is None:
        raise ValueError(f"{owner} needs data: x of padded sequences (or x=None, length=T)")
    if likelihood == "bernoulli":
        if x.dim() != 3 or x.shape[-1] != data_dim:
            raise ValueError(
                f"x must have shape (N, T, {data_dim}) (frames of {data_dim} keys); "
                f"got {tuple(x.shape)}"
            )
        if not torch.all((x == 0) | (x == 1)):
            raise ValueError("x must hold 0/1 frames for Bernoulli emissions")
    else:
        if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"x must be (N, T) integer tokens; got {tuple(x.shape)} of {x.dtype}")
        if x.numel() and (x.min() < 0 or x.max() >= data_dim):
            raise ValueError(
                f"tokens must lie in 0..{data_dim - 1}; got {int(x.min())}..{int(x.max())}"
            )
    if lengths is not None:
        if lengths.dim() != 1 or len(lengths) != len(x):
            raise ValueError(
                f"lengths must be (N,) = ({len(x)},), one per sequence; got {tuple(lengths.shape)}"
            )
        if lengths.numel() and (lengths.min() < 1 or lengths.max() > x.shape[1]):
            raise ValueError(
                f"lengths must lie in 1..{x.shape[1]} (x's frames); "
                f"got {int(lengths.min())}..{int(lengths.max())}"
            )


def trim(x: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, lengths)`` with x cut to the longest sequence (lengths default to x's frames)."""
    if lengths is None:
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
    frames = int(lengths.max()) if lengths.numel() else x.shape[1]
    return x[:, :frames], lengths


def num_sequences(x: torch.Tensor | None, batch_size: int | None, length: int | None) -> int:
    if x is not None:
        return x.shape[0]
    if length is None:
        raise ValueError("to sample, give length= (frames per sequence); e.g. model(length=32)")
    check_int("length", length)
    return 1 if batch_size is None else check_int("batch_size", batch_size)


class FrameInput(nn.Module):
    """A frame (0/1 vector) or token as the decoder's input vector; index ``unknown`` is the
    start-of-sequence and dropped-frame input (learned)."""

    def __init__(self, config: RecurrentVAEConfig) -> None:
        super().__init__()
        self.tokens = config.likelihood == "categorical"
        self.unknown_index = config.data_dim  # the token embedding's extra row
        if self.tokens:
            self.embed: nn.Module = nn.Embedding(config.data_dim + 1, config.embed_dim)
        else:
            self.embed = nn.Linear(config.data_dim, config.embed_dim)
            self.unknown = nn.Parameter(torch.zeros(config.embed_dim))

    def forward(self, x: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Embed x (N, T[, D]); where ``drop`` (N, T) is True, the unknown input."""
        if self.tokens:
            return self.embed(x if drop is None else x.masked_fill(drop, self.unknown_index))
        out = self.embed(x)
        if drop is not None:
            out = torch.where(drop[..., None], self.unknown.expand_as(out), out)
        return out

    def start(self, n: int, device: torch.device) -> torch.Tensor:
        """The first frame's input, (n, 1, E)."""
        if self.tokens:
            index = torch.full((n, 1), self.unknown_index, device=device)
            return self.embed(index)
        return self.unknown.expand(n, 1, -1)


class RecurrentVAE(PyroModule):
    """p(z) p(x | z) with an autoregressive GRU decoder (see the module docstring).

    Example::

        >>> import torch, lvmkit
        >>> cfg = lvmkit.RecurrentVAEConfig(data_dim=6, latent_dim=2, hidden_dim=8, embed_dim=4)
        >>> model = lvmkit.RecurrentVAE(cfg)
        >>> model(length=5, batch_size=3).shape
        torch.Size([3, 5, 6])
    """

    def __init__(self, config: RecurrentVAEConfig) -> None:
        if not isinstance(config, RecurrentVAEConfig):
            raise TypeError(f"config must be a RecurrentVAEConfig; got {type(config).__name__}")
        super().__init__()
        self.config = config
        h, e = config.hidden_dim, config.embed_dim
        self.inputs = FrameInput(config)
        bar_input = h if config.bar_length else 0
        self.rnn = nn.GRU(e + bar_input, h, batch_first=True)
        self.out = nn.Linear(h, config.data_dim)
        if config.latent_dim:
            self.init_state = nn.Linear(config.latent_dim, h)
        else:
            self.h0 = nn.Parameter(torch.zeros(h))
        if config.bar_length:
            self.conductor = nn.GRU(1, h, batch_first=True)
            self.bar_state = nn.Linear(h, h)
        self.register_buffer("prior_loc", torch.zeros(config.latent_dim))
        self.register_buffer("prior_scale", torch.ones(config.latent_dim))

    def forward(
        self,
        x: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        *,
        length: int | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        n = num_sequences(x, batch_size, length)
        if x is not None:
            x, lengths = trim(x, lengths)
        with pyro.plate("sequences", n):
            z = None
            if self.config.latent_dim:
                prior = dist.Normal(self.prior_loc, self.prior_scale).to_event(1)
                z = pyro.sample("z", prior)  # (..., N, Dz)
            if x is None:  # ancestral sampling, then the drawn frames scored as x
                assert length is not None
                x = self.generate(z, n, length)
                lengths = torch.full((n,), length, dtype=torch.long, device=x.device)
            logits = self.logits(z, x, n)  # teacher forcing: frame t sees frames < t
            assert lengths is not None
            mask = sequence_mask(lengths, x.shape[1])
            return pyro.sample("x", self.emission(logits, mask), obs=x)

    def emission(self, logits: torch.Tensor, mask: torch.Tensor) -> dist.TorchDistribution:
        """p(x | ·) per sequence: frames masked past each length, event (T[, D])."""
        if self.config.likelihood == "bernoulli":
            return dist.Bernoulli(logits=logits).mask(mask[..., None]).to_event(2)
        return dist.Categorical(logits=logits).mask(mask).to_event(1)

    # -- the decoder --------------------------------------------------------------------------

    def _state(self, z: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Initial decoder state, (B, H) for B = prod(z's batch dims) (or ``batch``)."""
        if z is None:
            return self.h0.expand(batch, -1)
        return torch.tanh(self.init_state(z.reshape(-1, z.shape[-1])))

    def logits(self, z: torch.Tensor | None, x: torch.Tensor, n: int) -> torch.Tensor:
        """Teacher-forced logits for x (N, T[, D]) under codes z (..., N, Dz): (..., N, T, out)."""
        batch_dims = z.shape[:-1] if z is not None else (n,)
        b = math.prod(batch_dims)
        frames = x.shape[1]
        drop = None
        if self.training and self.config.frame_dropout > 0:
            drop = torch.rand(x.shape[:2], device=x.device) < self.config.frame_dropout
        previous = self.inputs(x, drop)[:, :-1]  # the inputs of frames 1..T-1
        inputs = torch.cat([self.inputs.start(n, x.device), previous], dim=1)  # (N, T, E)
        inputs = inputs.expand(*batch_dims, frames, inputs.shape[-1]).reshape(b, frames, -1)
        state = self._state(z, b)
        if self.config.bar_length:
            hidden = self._bars(state, inputs)
        else:
            hidden, _ = self.rnn(inputs, state[None].contiguous())
        return self.out(hidden).reshape(*batch_dims, frames, -1)

    def _conduct(self, state: torch.Tensor, bars: int) -> torch.Tensor:
        """The conductor's bar embeddings (B, U, H) from the code's state (B, H)."""
        zeros = state.new_zeros(state.shape[0], bars, 1)
        c, _ = self.conductor(zeros, state[None].contiguous())
        return c

    def _bars(self, state: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        b, frames, e = inputs.shape
        length = self.config.bar_length
        assert length is not None
        bars = -(-frames // length)
        c = self._conduct(state, bars)  # (B, U, H)
        padded = F.pad(inputs, (0, 0, 0, bars * length - frames))
        per_bar = torch.cat(
            [padded.reshape(b, bars, length, e), c[:, :, None].expand(-1, -1, length, -1)], -1
        ).reshape(b * bars, length, -1)
        h0 = torch.tanh(self.bar_state(c)).reshape(1, b * bars, -1)
        hidden, _ = self.rnn(per_bar, h0)
        return hidden.reshape(b, bars * length, -1)[:, :frames]

    @torch.no_grad()
    def generate(
        self, z: torch.Tensor | None, n: int, length: int, *, greedy: bool = False
    ) -> torch.Tensor:
        """Ancestral sampling of ``length`` frames, each fed back as the next input (``greedy``:
        each frame's most probable keys or token instead of a draw)."""
        if z is not None and z.dim() > 2:
            raise ValueError("sampling takes one code per sequence; got extra batch dims")
        state = self._state(z, n)[None].contiguous()
        device = state.device
        c = None
        if self.config.bar_length:
            c = self._conduct(state[0], -(-length // self.config.bar_length))
        step_input = self.inputs.start(n, device)
        frames = []
        for t in range(length):
            if c is not None:
                assert self.config.bar_length is not None
                u, within = divmod(t, self.config.bar_length)
                if within == 0:
                    state = torch.tanh(self.bar_state(c[:, u]))[None].contiguous()
                step_input = torch.cat([step_input, c[:, u : u + 1]], -1)
            hidden, state = self.rnn(step_input, state)
            logits = self.out(hidden[:, 0])
            if self.config.likelihood == "bernoulli":
                frame = (logits > 0).float() if greedy else torch.bernoulli(torch.sigmoid(logits))
            elif greedy:
                frame = logits.argmax(-1)
            else:
                frame = torch.distributions.Categorical(logits=logits).sample()
            frames.append(frame)
            step_input = self.inputs(frame[:, None])
        return torch.stack(frames, dim=1)

    def validate_data(self, x=None, lengths=None, **_: object) -> None:
        """Raise ``ValueError`` when ``(x, lengths)`` cannot be scored (called by ``fit``)."""
        check_sequences(x, lengths, self.config.data_dim, self.config.likelihood, "RecurrentVAE")


# -- the deep Markov model --------------------------------------------------------------------


@dataclass(frozen=True)
class DMMConfig:
    """Sizes of a :class:`DeepMarkovModel` and its :class:`MarkovGuide` (Pyro's example uses
    z 100, emission 100, transition 200, RNN 600 on JSB; smaller defaults suit a CPU)."""

    data_dim: int = 88
    latent_dim: int = 32
    emission_dim: int = 64
    transition_dim: int = 128
    rnn_dim: int = 128

    def __post_init__(self) -> None:
        for name in ("data_dim", "latent_dim", "emission_dim", "transition_dim", "rnn_dim"):
            check_int(name, getattr(self, name))


class GatedTransition(nn.Module):
    """Krishnan et al.'s p(z_t | z_{t−1}): mean = (1 − g) ⊙ W z + g ⊙ h(z), g a learned gate."""

    def __init__(self, latent_dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, latent_dim)
        )
        self.proposal = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, latent_dim)
        )
        self.linear = nn.Linear(latent_dim, latent_dim)
        self.scale = nn.Linear(latent_dim, latent_dim)
        nn.init.eye_(self.linear.weight)  # start as the identity map, as in the paper
        nn.init.zeros_(self.linear.bias)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.sigmoid(self.gate(z))
        proposed = self.proposal(z)
        loc = (1 - gate) * self.linear(z) + gate * proposed
        return loc, F.softplus(self.scale(F.relu(proposed))) + 1e-4


class DeepMarkovModel(PyroModule):
    """The deep Markov model on Bernoulli frames (see the module docstring).

    Example::

        >>> import lvmkit
        >>> model = lvmkit.DeepMarkovModel(lvmkit.DMMConfig(data_dim=6, latent_dim=2))
        >>> model(length=4, batch_size=3).shape
        torch.Size([3, 4, 6])
    """

    def __init__(self, config: DMMConfig) -> None:
        if not isinstance(config, DMMConfig):
            raise TypeError(f"config must be a DMMConfig; got {type(config).__name__}")
        super().__init__()
        self.config = config
        self.transition = GatedTransition(config.latent_dim, config.transition_dim)
        self.emitter = nn.Sequential(
            nn.Linear(config.latent_dim, config.emission_dim),
            nn.ReLU(),
            nn.Linear(config.emission_dim, config.emission_dim),
            nn.ReLU(),
            nn.Linear(config.emission_dim, config.data_dim),
        )
        self.z_0 = nn.Parameter(torch.zeros(config.latent_dim))

    def forward(
        self,
        x: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        *,
        length: int | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        n = num_sequences(x, batch_size, length)
        if x is not None:
            x, lengths = trim(x, lengths)
            frames = x.shape[1]
        else:
            assert length is not None
            frames = length
            lengths = torch.full((n,), length, dtype=torch.long, device=self.z_0.device)
        assert lengths is not None
        mask = sequence_mask(lengths, frames)
        out = []
        with pyro.plate("sequences", n):
            z = self.z_0.expand(n, -1)
            for t in pyro.markov(range(frames)):
                with poutine.mask(mask=cast(torch.BoolTensor, mask[:, t])):
                    loc, scale = self.transition(z)
                    z = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))
                    emission = dist.Bernoulli(logits=self.emitter(z)).to_event(1)
                    obs = None if x is None else x[:, t]
                    out.append(pyro.sample(f"x_{t + 1}", emission, obs=obs))
        return torch.stack(out, dim=-2)

    def validate_data(self, x=None, lengths=None, **_: object) -> None:
        """Raise ``ValueError`` when ``(x, lengths)`` cannot be scored (called by ``fit``)."""
        check_sequences(x, lengths, self.config.data_dim, "bernoulli", "DeepMarkovModel")
