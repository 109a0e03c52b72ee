"""Model/guide pairs written the way Pyro's own examples and tutorials write them.

Each pair follows the calling conventions of one of Pyro's examples (read, then written anew here
at small sizes): its own argument names, plates named its own way, ``pyro.module`` on an
``nn.Module`` holding the networks, ``pyro.markov``, masks, ``poutine.scale``, autoguides and
``config_enumerate``. lvmkit must train and score each of them as it is: nothing in this file
knows about lvmkit.

- :class:`VAE` — ``examples/vae/vae.py``: ``model(x)``, a sigmoid decoder;
- :class:`CVAE` — ``examples/cvae/cvae.py``: ``model(xs, ys=None)``, a frozen baseline network
  feeding the prior, and the hidden pixels picked out with a boolean mask (``loc[xs == -1]``);
- :class:`SSVAE` — ``examples/vae/ss_vae_M2.py``: ``model(xs, ys=None)`` with one-hot labels, a
  size-less ``pyro.plate("data")``, the label enumerated in the guide, and Kingma's auxiliary
  classification term as a ``poutine.scale``-d observed site;
- :func:`gmm` — the Gaussian-mixture tutorial: ``model(data)``, global weights, locs and scale under
  an ``AutoDelta`` built from ``poutine.block(model, expose=...)``, fancy indexing
  ``locs[assignment]``, the assignment enumerated by ``config_enumerate``;
- :class:`DMM` — ``examples/dmm/dmm.py``: ``model(mini_batch, mini_batch_reversed, mini_batch_mask,
  mini_batch_seq_lengths, annealing_factor)``, a ``pyro.markov`` loop over time steps inside
  ``pyro.plate("z_minibatch")``, masks for variable lengths, an RNN guide over a reversed
  ``PackedSequence`` built per minibatch (:func:`dmm_minibatch`);
- :class:`NormVAE` — a VAE whose networks hold ``BatchNorm1d`` and ``Dropout``, as plain functions.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.infer.autoguide import AutoDelta
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

# -- the VAE of examples/vae/vae.py --------------------------------------------------------------


class _Encoder(nn.Module):
    def __init__(self, data_dim: int, z_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(data_dim, hidden)
        self.fc21 = nn.Linear(hidden, z_dim)
        self.fc22 = nn.Linear(hidden, z_dim)
        self.data_dim = data_dim

    def forward(self, x):
        hidden = nn.functional.softplus(self.fc1(x.reshape(-1, self.data_dim)))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class _Decoder(nn.Module):
    def __init__(self, data_dim: int, z_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden)
        self.fc21 = nn.Linear(hidden, data_dim)

    def forward(self, z):
        return torch.sigmoid(self.fc21(nn.functional.softplus(self.fc1(z))))


class VAE(nn.Module):
    def __init__(self, data_dim: int = 784, z_dim: int = 8, hidden: int = 64) -> None:
        super().__init__()
        self.encoder = _Encoder(data_dim, z_dim, hidden)
        self.decoder = _Decoder(data_dim, z_dim, hidden)
        self.z_dim, self.data_dim = z_dim, data_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample(
                "obs",
                dist.Bernoulli(loc_img, validate_args=False).to_event(1),
                obs=x.reshape(-1, self.data_dim),
            )
            return loc_img

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


# -- the CVAE of examples/cvae/ -------------------------------------------------------------------


class _CondEncoder(nn.Module):
    """(x with its hidden pixels filled in from y) → loc, scale."""

    def __init__(self, data_dim: int, z_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(data_dim, hidden)
        self.fc31 = nn.Linear(hidden, z_dim)
        self.fc32 = nn.Linear(hidden, z_dim)
        self.data_dim = data_dim

    def forward(self, x, y):
        filled = x.clone()
        filled[x == -1] = y[x == -1]
        hidden = torch.relu(self.fc1(filled.view(-1, self.data_dim)))
        return self.fc31(hidden), torch.exp(self.fc32(hidden))


class CVAE(nn.Module):
    def __init__(self, data_dim: int = 64, z_dim: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.baseline_net = nn.Sequential(nn.Linear(data_dim, hidden), nn.ReLU(),
                                          nn.Linear(hidden, data_dim), nn.Sigmoid())  # fmt: skip
        self.prior_net = _CondEncoder(data_dim, z_dim, hidden)
        self.generation_net = _Decoder(data_dim, z_dim, hidden)
        self.recognition_net = _CondEncoder(data_dim, z_dim, hidden)
        self.data_dim = data_dim

    def model(self, xs, ys=None):
        pyro.module("generation_net", self)
        batch_size = xs.shape[0]
        with pyro.plate("data"):
            with torch.no_grad():  # the baseline's guess feeds the prior; it is not trained here
                y_hat = self.baseline_net(xs).view(xs.shape)
            prior_loc, prior_scale = self.prior_net(xs, y_hat)
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            loc = self.generation_net(zs)
            if ys is not None:
                hidden = (xs == -1).view(-1, self.data_dim)
                mask_loc = loc[hidden].view(batch_size, -1)
                mask_ys = ys[xs == -1].view(batch_size, -1)
                pyro.sample(
                    "y", dist.Bernoulli(mask_loc, validate_args=False).to_event(1), obs=mask_ys
                )
            else:
                pyro.deterministic("y", loc.detach())
            return loc

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                y_hat = self.baseline_net(xs).view(xs.shape)
                loc, scale = self.prior_net(xs, y_hat)
            else:
                loc, scale = self.recognition_net(xs, ys)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def quadrant_task(images: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with the bottom half hidden (−1) and the full images as outputs."""
    xs = images.clone()
    hidden = torch.zeros(side, side, dtype=torch.bool)
    hidden[side // 2 :] = True
    xs[:, hidden.flatten()] = -1.0
    return xs, images


# -- the SS-VAE (M2) of examples/vae/ss_vae_M2.py ---------------------------------------------


class SSVAE(nn.Module):
    def __init__(
        self, data_dim: int = 64, classes: int = 4, z_dim: int = 4, hidden: int = 32,
        aux_loss_multiplier: float = 46.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.encoder_y = nn.Sequential(nn.Linear(data_dim, hidden), nn.Softplus(),
                                       nn.Linear(hidden, classes), nn.Softmax(dim=-1))  # fmt: skip
        self.encoder_z = nn.Sequential(nn.Linear(data_dim + classes, hidden), nn.Softplus(),
                                       nn.Linear(hidden, 2 * z_dim))  # fmt: skip
        self.decoder = nn.Sequential(nn.Linear(z_dim + classes, hidden), nn.Softplus(),
                                     nn.Linear(hidden, data_dim), nn.Sigmoid())  # fmt: skip
        self.classes, self.z_dim = classes, z_dim
        self.aux_loss_multiplier = aux_loss_multiplier

    @staticmethod
    def _cat(a, b):
        shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
        return torch.cat([a.expand(*shape, a.shape[-1]), b.expand(*shape, b.shape[-1])], -1)

    def model(self, xs, ys=None):
        pyro.module("ss_vae", self)
        batch_size = xs.size(0)
        with pyro.plate("data"):
            prior_loc = xs.new_zeros([batch_size, self.z_dim])
            prior_scale = xs.new_ones([batch_size, self.z_dim])
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            alpha_prior = xs.new_ones([batch_size, self.classes]) / (1.0 * self.classes)
            ys_ = pyro.sample("y", dist.OneHotCategorical(alpha_prior), obs=ys)
            loc = self.decoder(self._cat(zs, ys_))
            pyro.sample("x", dist.Bernoulli(loc, validate_args=False).to_event(1), obs=xs)
            if ys is not None:  # Kingma et al.'s auxiliary term: α · log q(y | x) on labels
                alpha = self.encoder_y(xs)
                with poutine.scale(scale=self.aux_loss_multiplier):
                    pyro.sample("y_aux", dist.OneHotCategorical(alpha), obs=ys)

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                alpha = self.encoder_y(xs)
                ys = pyro.sample("y", dist.OneHotCategorical(alpha))
            loc, log_scale = self.encoder_z(self._cat(xs, ys)).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    def classifier(self, xs):
        return self.encoder_y(xs).argmax(dim=-1)

    def enumerated_guide(self):
        return config_enumerate(self.guide, "parallel", expand=True)


# -- the Gaussian-mixture tutorial ----------------------------------------------------------------

K = 2


@config_enumerate
def gmm_model(data):
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def gmm_guide(data):
    """An AutoDelta over the global sites, initialised from the data as the tutorial does."""

    def init_loc_fn(site):
        if site["name"] == "weights":
            return torch.ones(K) / K
        if site["name"] == "scale":
            return (data.var() / 2).sqrt()
        if site["name"] == "locs":
            return data[torch.multinomial(torch.ones(len(data)) / len(data), K)]
        raise ValueError(site["name"])

    return AutoDelta(
        poutine.block(gmm_model, expose=["weights", "locs", "scale"]), init_loc_fn=init_loc_fn
    )


GMM_DATA = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])


# -- the deep Markov model of examples/dmm/dmm.py ----------------------------------------------


class _GatedTransition(nn.Module):
    def __init__(self, z_dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, z_dim))
        self.proposed = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, z_dim))
        self.z_to_loc = nn.Linear(z_dim, z_dim)
        self.sig = nn.Linear(z_dim, z_dim)
        with torch.no_grad():
            self.z_to_loc.weight.copy_(torch.eye(z_dim))
            self.z_to_loc.bias.zero_()

    def forward(self, z_prev):
        gate = torch.sigmoid(self.gate(z_prev))
        proposed = self.proposed(z_prev)
        loc = (1 - gate) * self.z_to_loc(z_prev) + gate * proposed
        scale = nn.functional.softplus(self.sig(torch.relu(proposed)))
        return loc, scale


class _Combiner(nn.Module):
    def __init__(self, z_dim: int, rnn_dim: int) -> None:
        super().__init__()
        self.z_to_hidden = nn.Linear(z_dim, rnn_dim)
        self.to_loc = nn.Linear(rnn_dim, z_dim)
        self.to_scale = nn.Linear(rnn_dim, z_dim)

    def forward(self, z_prev, h_rnn):
        h = 0.5 * (torch.tanh(self.z_to_hidden(z_prev)) + h_rnn)
        return self.to_loc(h), nn.functional.softplus(self.to_scale(h))


class DMM(nn.Module):
    def __init__(
        self, input_dim: int = 12, z_dim: int = 3, emission_dim: int = 16,
        transition_dim: int = 16, rnn_dim: int = 16,
    ) -> None:  # fmt: skip
        super().__init__()
        self.emitter = nn.Sequential(
            nn.Linear(z_dim, emission_dim), nn.ReLU(), nn.Linear(emission_dim, input_dim)
        )
        self.trans = _GatedTransition(z_dim, transition_dim)
        self.combiner = _Combiner(z_dim, rnn_dim)
        self.rnn = nn.RNN(input_dim, rnn_dim, nonlinearity="relu", batch_first=True)
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.z_q_0 = nn.Parameter(torch.zeros(z_dim))
        self.h_0 = nn.Parameter(torch.zeros(1, 1, rnn_dim))

    def model(
        self, mini_batch, mini_batch_reversed, mini_batch_mask, mini_batch_seq_lengths,
        annealing_factor=1.0,
    ):  # fmt: skip
        T_max = mini_batch.size(1)
        pyro.module("dmm", self)
        z_prev = self.z_0.expand(mini_batch.size(0), self.z_0.size(0))
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(1, T_max + 1)):
                z_loc, z_scale = self.trans(z_prev)
                with poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample(
                        f"z_{t}",
                        dist.Normal(z_loc, z_scale).mask(mini_batch_mask[:, t - 1 : t]).to_event(1),
                    )
                logits = self.emitter(z_t)
                pyro.sample(
                    f"obs_x_{t}",
                    dist.Bernoulli(logits=logits).mask(mini_batch_mask[:, t - 1 : t]).to_event(1),
                    obs=mini_batch[:, t - 1, :],
                )
                z_prev = z_t

    def guide(
        self, mini_batch, mini_batch_reversed, mini_batch_mask, mini_batch_seq_lengths,
        annealing_factor=1.0,
    ):  # fmt: skip
        T_max = mini_batch.size(1)
        pyro.module("dmm", self)
        h_0 = self.h_0.expand(1, mini_batch.size(0), self.rnn.hidden_size).contiguous()
        rnn_output, _ = self.rnn(mini_batch_reversed, h_0)
        rnn_output = _pad_and_reverse(rnn_output, mini_batch_seq_lengths)
        z_prev = self.z_q_0.expand(mini_batch.size(0), self.z_q_0.size(0))
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(1, T_max + 1)):
                z_loc, z_scale = self.combiner(z_prev, rnn_output[:, t - 1, :])
                with poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample(
                        f"z_{t}",
                        dist.Normal(z_loc, z_scale).mask(mini_batch_mask[:, t - 1 : t]).to_event(1),
                    )
                z_prev = z_t


def _reverse_sequences(mini_batch, seq_lengths):
    reversed_batch = torch.zeros_like(mini_batch)
    for b in range(mini_batch.size(0)):
        n = int(seq_lengths[b])
        reversed_batch[b, :n] = mini_batch[b, :n].flip(0)
    return reversed_batch


def _pad_and_reverse(rnn_output, seq_lengths):
    padded, _ = nn.utils.rnn.pad_packed_sequence(rnn_output, batch_first=True)
    return _reverse_sequences(padded, seq_lengths)


def dmm_minibatch(sequences: torch.Tensor, seq_lengths: torch.Tensor):
    """The DMM's arguments for a minibatch (as the example's ``get_mini_batch`` makes them): the
    sequences cut to the longest one present, the reversed ones packed for the RNN, the mask."""
    T_max = int(seq_lengths.max())
    mini_batch = sequences[:, :T_max]
    reversed_batch = _reverse_sequences(mini_batch, seq_lengths)
    mask = (torch.arange(T_max)[None, :] < seq_lengths[:, None]).to(mini_batch.dtype)
    packed = pack_padded_sequence(
        reversed_batch, seq_lengths.cpu(), batch_first=True, enforce_sorted=False
    )
    return mini_batch, packed, mask, seq_lengths


def dmm_data(num: int = 24, t_max: int = 7, input_dim: int = 12, seed: int = 0):
    """Binary sequences of lengths 3…t_max that follow a slowly drifting pattern."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, t_max + 1, (num,), generator=g)
    base = torch.rand(num, 1, input_dim, generator=g)
    drift = 0.3 * torch.randn(num, t_max, input_dim, generator=g).cumsum(1)
    probs = torch.sigmoid(4 * (base - 0.5) + drift)
    seqs = torch.bernoulli(probs, generator=g)
    seqs = seqs * (torch.arange(t_max)[None, :, None] < lengths[:, None, None])
    return seqs, lengths


# -- BatchNorm and Dropout in the networks, as plain functions ----------------------------------


def norm_vae(data_dim: int = 16, z_dim: int = 2, hidden: int = 16):
    """``(model, guide)``: plain functions over an encoder with BatchNorm1d and Dropout."""
    encoder = nn.Sequential(
        nn.Linear(data_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(hidden, 2 * z_dim),
    )  # fmt: skip
    decoder = nn.Sequential(
        nn.Linear(z_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, data_dim)
    )

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        loc, log_scale = encoder(x).chunk(2, dim=-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    return model, guide, encoder, decoder
