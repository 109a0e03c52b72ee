"""Speed of SVI on the MNIST VAE: lvmkit against NumPyro's jitted step and a hand-written PyTorch
loop, in one process.

Every contender trains its own copy of the same 784-400-20 network (same initial weights, same
minibatches) with Adam at lr 1e-3. Contenders alternate round by round, so that thermal or
background drift hits them alike; each step is timed on its own (with CUDA synchronised around it)
after warm-up steps that are not timed (compilation happens there). Ratios are to the contenders
measured in the same run: ``ratio_to_numpyro`` to NumPyro's ``SVI.update`` under ``jax.jit`` (the
peer a user picks when SVI must be fast), ``ratio_to_pytorch_fused`` to the hand-written loop with
the same optimizer as lvmkit's (fused Adam where torch has the kernel).

Contenders:

- ``numpyro_jit``: the same VAE in NumPyro, ``SVI.update`` under ``jax.jit`` (CPU only; needs the
  ``numpyro`` extra, otherwise a skipped row says so), with XLA on as many threads as torch;
- ``pytorch``: the floor of eager torch: encoder → reparameterised z → decoder, fused
  BCE-with-logits plus the analytic KL, ``torch.optim.Adam`` (foreach, torch's default);
- ``pytorch_fused``: the same with ``Adam(fused=True)``;
- ``lvmkit``: the very step ``fit`` runs (``inference.step.prepare`` → ``Trainer.step``) with
  ``compile=True``: the Trace_ELBO loss captured as an FX graph, its gradients and Adam compiled
  as one function (:mod:`lvmkit.inference.compiled`; compiled during warm-up);
- ``lvmkit_user_pair``: the same networks as a user's own pair (plain functions registering them
  with ``pyro.module``, as Pyro's VAE tutorial writes them, nothing declared to lvmkit) with fit's
  default for a long run (``compile=None``: compiled where its check passes);
- ``lvmkit_eager``: the built-in pair with ``compile=False``, validation off as after fit's first
  step;
- ``lvmkit_mean_field``: the eager step with the analytic-KL objective;
- ``pytorch_iwae`` and ``lvmkit_iwae``: the importance-weighted bound with K = ``iwae_particles``
  samples per point, hand-written (fused Adam) and as ``fit(objective="iwae")`` trains it; the
  IWAE row's note gives its ratio to the hand-written IWAE loop (its other ratios compare it with
  the one-sample ELBO loops, i.e. they include the K-fold work);
- ``pyro_svi``: Pyro's own ``SVI`` + ``Trace_ELBO`` + ``pyro.optim.Adam``, for reference.

Whole epochs are timed too (task ``epoch``): ``lvmkit.fit`` on the classic 50,000-image training
split against the hand-written loop with fused Adam and NumPyro's jitted update, both going through
the same images in the same shuffled order (index batches from device-resident data — NumPyro's
gathered inside its jitted function — one loss read at the end). They alternate epoch by epoch: a
callback at the end of each of fit's epochs runs one epoch of each other loop, so each lvmkit epoch
is the wall time between two of fit's epoch ends — steps, the end-of-epoch NaN check and host sync,
history row and in-memory rollback snapshot included; fit's first epoch (Pyro's validation step,
capture and compilation) is not counted, nor the others' first (NumPyro's jit).

Task ``epoch`` runs the built-in pair and the same networks as a user's own pair, and reports
what a short run costs: ``setup_s`` (the call to the first step: data, checks, the first-call
probe), ``first_epoch_s`` (Pyro's validation step, capture, check and compilation),
``compile_s`` (capture, check and compilation alone), and ``ratio_with_setup`` /
``ratio_with_setup_to_numpyro`` (fit's whole wall time over the other loop's for the same epochs,
first epochs included).

Task ``overhead`` (:class:`OverheadConfig`) is the CPU stand-in for the GPU, whose step the host
bounds: a 16-8-2 VAE at batch 8, whose arithmetic is negligible, so that the host microseconds
per step are what is measured — NumPyro's jitted step, the hand-written steps (foreach and fused
Adam), lvmkit's compiled and eager steps, a user's plain-function pair as ``fit`` runs it on a
long run and eagerly, and Pyro's ``SVI`` (``overhead step``), then whole ``fit`` epochs of 2,000
steps against the hand-written loop and NumPyro (``overhead fit``), all on one thread.

``evaluate`` (importance-sampled log-likelihood, K = 5000) is timed on ``eval_points`` test images
(on CUDA: all 10,000) as it runs by default (its pass compiled where that repays itself, the
compilation counted) and eagerly (``lvmkit_eager``), and once per ``max_pairs`` setting on
``sweep_points`` images (task ``evaluate max_pairs``: too few to compile for), which is how
:data:`lvmkit.inference.weights.DEFAULT_MAX_PAIRS` is chosen per device.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import pyro
import pyro.distributions as dist
import pyro.infer
import pyro.optim
import torch
from torch.nn import functional as F

from lvmkit import plots
from lvmkit.base import check_choice
from lvmkit.data import load_mnist
from lvmkit.guides import GaussianEncoder, GaussianEncoderConfig
from lvmkit.inference import evaluate, fit
from lvmkit.inference.callbacks import Callback
from lvmkit.inference.calls import as_data
from lvmkit.inference.devices import resolve_device
from lvmkit.inference.feeds import load
from lvmkit.inference.loop import epoch_order
from lvmkit.inference.optim import OptimSpec
from lvmkit.inference.step import prepare
from lvmkit.inference.weights import DEFAULT_MAX_PAIRS
from lvmkit.models import VAE, VAEConfig

MNIST_TRAIN_SIZE = 50_000  # images per epoch of the classic split


@dataclass(frozen=True)
class SpeedConfig:
    """What the speed benchmark measures."""

    batch_sizes: tuple[int, ...] = (128, 1024)  # the two regimes
    hidden_dim: int = 400  # the PyTorch VAE example's 784-400-20 network
    latent_dim: int = 20
    lr: float = 1e-3
    iwae_particles: int = 5  # K of the IWAE contenders (the IWAE paper's k = 5)
    warmup_steps: int = 10  # untimed: allocator, caches, one-off compilation
    timed_steps: int = 40  # timed steps per contender per round
    rounds: int = 5  # contenders alternate each round
    eval_points: int = 1000  # evaluate is reported per 1,000 test points
    eval_points_cuda: int = 10_000  # the whole test set where a GPU makes it quick
    eval_samples: int = 5000  # the standard K
    train_points: int = 10_000  # minibatches are drawn from these (binarized once)
    epoch_points: int = MNIST_TRAIN_SIZE  # images per timed epoch
    epoch_rounds: int = 5  # timed epochs per contender (after one untimed epoch of fit)
    sweep_points: int = 100  # test images per max_pairs setting
    sweep_points_cuda: int = 1000
    max_pairs_grid: tuple[int, ...] = (1024, 4096, 16384, 65536)
    max_pairs_grid_cuda: tuple[int, ...] = (16384, 65536, 262_144, 1_048_576)
    seed: int = 0
    overhead: OverheadConfig = field(default_factory=lambda: OverheadConfig())


@dataclass(frozen=True)
class OverheadConfig:
    """The ``overhead`` task: a network so small that its arithmetic is negligible, on the CPU,
    so that what is measured is what each step costs the host — the CPU stand-in for a GPU step,
    which the host bounds (shared/measurements/h200-2026-12-04)."""

    data_dim: int = 16
    hidden_dim: int = 8
    latent_dim: int = 2
    batch_size: int = 8
    warmup_steps: int = 50
    timed_steps: int = 50  # per contender per round: many short rounds, as this machine's
    rounds: int = 20  # speed drifts by ±10 % over seconds and must hit every contender alike
    epoch_steps: int = 2000  # steps per epoch of the whole-fit rows
    epoch_rounds: int = 5  # timed epochs per contender, after one untimed


PROFILES = {
    "full": SpeedConfig(),
    "quick": SpeedConfig(
        batch_sizes=(32,),
        hidden_dim=32,
        latent_dim=4,
        warmup_steps=2,
        timed_steps=3,
        rounds=2,
        eval_points=20,
        eval_points_cuda=20,
        eval_samples=50,
        train_points=256,
        epoch_points=256,
        epoch_rounds=2,
        sweep_points=10,
        sweep_points_cuda=10,
        max_pairs_grid=(64, 256),
        max_pairs_grid_cuda=(64, 256),
        overhead=OverheadConfig(
            warmup_steps=5, timed_steps=10, rounds=2, epoch_steps=110, epoch_rounds=1
        ),
    ),
}

Step = Callable[[torch.Tensor], torch.Tensor]


def run(
    profile: str = "full",
    *,
    device: str = "auto",
    config: SpeedConfig | None = None,
    figures_dir: str | Path | None = None,
) -> pd.DataFrame:
    """Measure every contender on ``device``; one row per (task, batch size, contender)."""
    cfg = config or PROFILES[check_choice("profile", profile, PROFILES)]
    dev = resolve_device(device)
    train = load_mnist("train", binarization="static", seed=cfg.seed, limit=cfg.train_points).x
    train = train.to(dev)
    rows: list[dict[str, object]] = []
    for batch_size in cfg.batch_sizes:
        rows += _time_steps(cfg, dev, train, batch_size)
    del train
    epoch_data = load_mnist(
        "train", binarization="static", seed=cfg.seed, limit=cfg.epoch_points
    ).x.to(dev)
    for batch_size in cfg.batch_sizes:
        rows += _time_epochs(cfg, dev, epoch_data, batch_size)
    del epoch_data
    rows += _time_evaluate(cfg, dev)
    rows += _sweep_max_pairs(cfg, dev)
    rows += _time_overhead(cfg)
    frame = pd.DataFrame(rows)
    for column in ("batch_size", "max_pairs"):  # each empty on some rows
        frame[column] = frame[column].astype("Int64")
    frame.insert(0, "device", _device_name(dev))
    if figures_dir is not None:
        speed_figure(frame, Path(figures_dir) / "speed-step-time.png")
    return frame


def speed_figure(frame: pd.DataFrame, path: Path):
    """Median step time of each contender relative to hand-written PyTorch, per batch size."""
    plt = plots.pyplot()
    steps = frame[frame["task"] == "svi_step"]
    sizes = sorted(steps["batch_size"].dropna().unique())
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 3.4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        part = steps[steps["batch_size"] == size]
        ax.barh(part["contender"], part["ratio_to_pytorch"], color="C0")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.axvline(1.1, color="C3", lw=0.8, ls="--", label="1.10× target")
        ax.set_xlabel("median step time / hand-written PyTorch")
        ax.set_title(f"batch {int(size)}", fontsize=9)
        ax.invert_yaxis()
        ax.legend(fontsize=7)
    fig.suptitle(f"SVI step time on {frame['device'].iloc[0]}", fontsize=9)
    fig.tight_layout()
    return plots.save(fig, path)


def _networks(cfg: SpeedConfig, data_dim: int, dev: torch.device) -> tuple[VAE, GaussianEncoder]:
    pyro.set_rng_seed(cfg.seed)  # every contender starts from the same weights
    vae = VAE(
        VAEConfig(data_dim=data_dim, latent_dim=cfg.latent_dim, hidden_dims=(cfg.hidden_dim,))
    )
    encoder = GaussianEncoder(
        GaussianEncoderConfig(
            data_dim=data_dim, latent_dim=cfg.latent_dim, hidden_dims=(cfg.hidden_dim,)
        )
    )
    return vae.to(dev), encoder.to(dev)


def _pytorch_step(
    cfg: SpeedConfig, dev, data_dim: int, *, fused: bool, particles: int | None = None
) -> Step:
    """The hand-written loop's step: the ELBO with the analytic KL, or with ``particles`` the
    importance-weighted bound with that many samples per point."""
    model, guide = _networks(cfg, data_dim, dev)
    params = [*model.parameters(), *guide.parameters()]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, fused=fused or None)

    def step(x: torch.Tensor) -> torch.Tensor:
        if particles is None:
            loss = _elbo_loss(model, guide, x)
        else:
            loss = _iwae_loss(model, guide, x, particles)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _elbo_loss(model: VAE, guide: GaussianEncoder, x: torch.Tensor) -> torch.Tensor:
    loc, scale = guide.encode(x)  # (B, Dz) each
    z = loc + scale * torch.randn_like(loc)  # reparameterised sample, (B, Dz)
    logits = model.decoder(z)  # (B, D)
    reconstruction = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1.0 - 2.0 * scale.log()).sum()
    return reconstruction + kl


def _iwae_loss(model: VAE, guide: GaussianEncoder, x: torch.Tensor, k: int) -> torch.Tensor:
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    loc, scale = guide.encode(x)  # (B, Dz) each
    eps = torch.randn((k, *loc.shape), device=loc.device)  # (K, B, Dz)
    z = loc + scale * eps
    logits = model.decoder(z)  # (K, B, D)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(
        -1
    )  # (K, B)
    log_pz = (-0.5 * z.pow(2) - half_log_2pi).sum(-1)
    log_qz = (-0.5 * eps.pow(2) - scale.log() - half_log_2pi).sum(-1)
    bound = torch.logsumexp(log_px + log_pz - log_qz, dim=0) - math.log(k)  # (B,)
    return -bound.sum()


def _plain_pair(cfg: SpeedConfig, data_dim: int, dev) -> tuple[Any, Any]:
    """The same networks as a user's own pair, written as Pyro's VAE tutorial writes it:
    functions registering their networks with ``pyro.module``, nothing declared to lvmkit."""
    vae, encoder = _networks(cfg, data_dim, dev)
    decoder, net, latent = vae.decoder, encoder.net, cfg.latent_dim

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            loc = x.new_zeros(x.shape[0], latent)  # (B, Dz)
            z = pyro.sample("z", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", net)
        with pyro.plate("data", x.shape[0]):
            loc, log_var = net(x).split(latent, dim=-1)  # (B, Dz) each
            pyro.sample("z", dist.Normal(loc, torch.exp(0.5 * log_var)).to_event(1))

    return model, guide


def _lvmkit_step(
    cfg: SpeedConfig,
    dev,
    batch: torch.Tensor,
    *,
    objective: str,
    compile: bool | None,
    particles: int = 1,
    pair: Callable[[SpeedConfig, int, Any], tuple[Any, Any]] | None = None,
) -> Step:
    """lvmkit's training step itself: the :class:`~lvmkit.inference.step.Trainer` that ``fit``
    builds for these options (``prepare``), stepped as ``fit`` steps it. ``compile=None`` is
    fit's default for a long run (compiled where the pair's check passes)."""
    model, guide = (pair or _networks)(cfg, batch.shape[1], dev)
    trainer = prepare(
        model, guide, load(batch, model, guide, batch_size=len(batch), device=dev).train,
        objective=objective, num_particles=particles, compile=compile,
        optim=OptimSpec(lr=cfg.lr),
    )  # fmt: skip

    calls: dict[int, Any] = {}  # each minibatch's call, built once as fit builds its data once

    def step(x: torch.Tensor) -> torch.Tensor:
        call = calls.get(id(x))
        if call is None:
            call = calls[id(x)] = [as_data(x, model)]
        with pyro.validation_enabled(False):  # as in fit after its first, validated step
            return trainer.step(call)

    return step


def _pyro_svi_step(cfg: SpeedConfig, dev, data_dim: int) -> Step:
    model, guide = _networks(cfg, data_dim, dev)
    adam = pyro.optim.Adam({"lr": cfg.lr})  # type: ignore[attr-defined]  # generated at import
    svi = pyro.infer.SVI(model, guide, adam, pyro.infer.Trace_ELBO())

    def step(x: torch.Tensor) -> torch.Tensor:
        with pyro.validation_enabled(False):
            return torch.tensor(svi.step(x))  # SVI.step returns a float: it syncs every step

    return step


def _contenders(cfg: SpeedConfig, dev, batch: torch.Tensor) -> dict[str, Callable[[], Step]]:
    """How to build each contender (each is built inside its own param store)."""
    data_dim = batch.shape[1]
    k = cfg.iwae_particles
    return {
        "pytorch": lambda: _pytorch_step(cfg, dev, data_dim, fused=False),
        "pytorch_fused": lambda: _pytorch_step(cfg, dev, data_dim, fused=True),
        "lvmkit": lambda: _lvmkit_step(cfg, dev, batch, objective="elbo", compile=True),
        "lvmkit_eager": lambda: _lvmkit_step(cfg, dev, batch, objective="elbo", compile=False),
        "lvmkit_user_pair": lambda: _lvmkit_step(
            cfg, dev, batch, objective="elbo", compile=None, pair=_plain_pair
        ),
        "lvmkit_mean_field": lambda: _lvmkit_step(
            cfg, dev, batch, objective="mean_field", compile=False
        ),
        "pytorch_iwae": lambda: _pytorch_step(cfg, dev, data_dim, fused=True, particles=k),
        "lvmkit_iwae": lambda: _lvmkit_step(
            cfg, dev, batch, objective="iwae", compile=False, particles=k
        ),
        "pyro_svi": lambda: _pyro_svi_step(cfg, dev, data_dim),
    }


def _time_steps(
    cfg: SpeedConfig,
    dev,
    train: torch.Tensor,
    batch_size: int,
    contenders: dict[str, Callable[[], Step]] | None = None,
    task: str = "svi_step",
) -> list[dict[str, object]]:
    generator = torch.Generator().manual_seed(cfg.seed)
    total = cfg.warmup_steps + cfg.rounds * cfg.timed_steps
    batches = [
        train[torch.randint(len(train), (batch_size,), generator=generator).to(dev)]
        for _ in range(min(total, 64))  # reused cyclically: the same batches for everyone
    ]
    # Each contender keeps its own Pyro param store, as each fit does: their parameter names agree.
    store = pyro.get_param_store()
    makers = contenders or _contenders(cfg, dev, batches[0])
    states: dict[str, Any] = {name: {"params": {}, "constraints": {}} for name in makers}
    steps: dict[str, Step] = {}
    for name, make in makers.items():
        with store.scope(state=states[name]):
            steps[name] = make()
    numpyro_note = _add_numpyro(steps, cfg, dev, batches)
    for name in steps:  # (NumPyro keeps no Pyro parameters, but is timed alike)
        states.setdefault(name, {"params": {}, "constraints": {}})
    times: dict[str, list[float]] = {name: [] for name in steps}
    peak: dict[str, float] = {}
    for name, step in steps.items():
        with store.scope(state=states[name]):
            for i in range(cfg.warmup_steps):
                step(batches[i % len(batches)])
    for round_ in range(cfg.rounds):
        for name, step in steps.items():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            with store.scope(state=states[name]):
                for i in range(cfg.timed_steps):
                    batch = batches[
                        (cfg.warmup_steps + round_ * cfg.timed_steps + i) % len(batches)
                    ]
                    times[name].append(_timed(dev, step, batch))
            if dev.type == "cuda":
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated(dev) / 2**20)
    floor = statistics.median(times["pytorch"])
    fused_floor = statistics.median(times["pytorch_fused"])  # lvmkit's optimizer is fused Adam
    numpyro = statistics.median(times["numpyro_jit"]) if "numpyro_jit" in times else math.nan
    notes: dict[str, str] = {}
    if "lvmkit_iwae" in times:  # lvmkit's IWAE against the same bound written by hand
        iwae = statistics.median(times["lvmkit_iwae"]) / statistics.median(times["pytorch_iwae"])
        notes["pytorch_iwae"] = f"K={cfg.iwae_particles}"
        notes["lvmkit_iwae"] = f"K={cfg.iwae_particles}; {iwae:.2f}× pytorch_iwae"
    rows: list[dict[str, object]] = []
    for name, values in times.items():
        median = statistics.median(values)
        q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (median,) * 3
        rows.append(
            {
                "task": task,
                "batch_size": batch_size,
                "contender": name,
                "median_ms": 1e3 * median,
                "median_us": 1e6 * median,
                "iqr_ms": 1e3 * (q3 - q1),
                "examples_per_s": batch_size / median,
                "epoch_s": math.ceil(MNIST_TRAIN_SIZE / batch_size) * median,
                "peak_mem_mib": peak.get(name, math.nan),
                "ratio_to_pytorch": median / floor,
                "ratio_to_pytorch_fused": median / fused_floor,
                "ratio_to_numpyro": median / numpyro,
                "note": notes.get(name, ""),
            }
        )
    if numpyro_note:
        rows.append(
            {
                "task": task,
                "batch_size": batch_size,
                "contender": "numpyro_jit",
                "note": numpyro_note,
            }
        )
    return rows


def _add_numpyro(steps: dict[str, Step], cfg: SpeedConfig, dev, batches: list[torch.Tensor]) -> str:
    """Add the NumPyro contender to ``steps``; return why it was left out, or ""."""
    _numpyro_vae, why = _import_numpyro(dev)
    if _numpyro_vae is None:
        return why
    import jax.numpy as jnp

    arrays = {id(b): jnp.asarray(b.numpy()) for b in batches}  # converted once, outside timing
    step = _numpyro_vae.make_step(
        batches[0].shape[1], cfg.hidden_dim, cfg.latent_dim, cfg.lr, batches[0].numpy(), cfg.seed
    )
    steps["numpyro_jit"] = lambda x: step(arrays[id(x)])
    return ""


def _import_numpyro(dev: torch.device) -> tuple[Any, str]:
    """The NumPyro contender's module, or None and why not (another device than the CPU, or
    NumPyro not installed). XLA is told to use as many CPU threads as torch does here (one, in
    the overhead task and on a 1-thread run), so that each contender computes with the same
    cores."""
    if dev.type != "cpu":
        return None, "skipped: the NumPyro contender runs JAX on the CPU; compare on device cpu"
    if "jax" not in sys.modules and torch.get_num_threads() == 1:
        os.environ.setdefault(
            "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    try:
        from lvmkit.benchmarks import _numpyro_vae
    except ImportError as err:
        return None, f"skipped: NumPyro/JAX not installed ({err}); pip install 'lvmkit[numpyro]'"
    return _numpyro_vae, ""


def _timed(dev: torch.device, fn: Callable[..., object], *args: Any, **kwargs: Any) -> float:
    """Wall seconds of ``fn(*args, **kwargs)``, with the device synchronised on both sides."""
    _synchronize(dev)
    tic = time.perf_counter()
    fn(*args, **kwargs)
    _synchronize(dev)
    return time.perf_counter() - tic


class _Alternate(Callback):
    """Times fit's epochs end to end and runs one epoch of each other contender after each of
    them; also fit's set-up (from the call to the first step: data, checks, the first-call
    probe) and its first epoch (Pyro's validation step, capture and compilation)."""

    def __init__(self, dev: torch.device, others: dict[str, Callable[[int], float]]) -> None:
        self.dev, self.others = dev, others
        self.ours: list[float] = []
        self.other: dict[str, list[float]] = {name: [] for name in others}  # after the first
        self.other_all: dict[str, list[float]] = {name: [] for name in others}
        self.mark: float | None = None
        self.called = self.started = self.first_epoch = math.nan

    def on_fit_start(self, info: Any) -> None:
        _synchronize(self.dev)
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        _synchronize(self.dev)
        now = time.perf_counter()
        if self.mark is not None:  # fit's first epoch (validation, compilation) is not counted
            self.ours.append(now - self.mark)
        else:
            self.first_epoch = now - self.started
        for name, run in self.others.items():
            seconds = run(epoch)
            self.other_all[name].append(seconds)
            if epoch > 1:  # each other loop's first epoch is its warm-up (NumPyro: its jit)
                self.other[name].append(seconds)
        _synchronize(self.dev)
        self.mark = time.perf_counter()

    def spent_on_others(self) -> float:
        return sum(sum(values) for values in self.other_all.values())


def _pytorch_epoch(
    cfg: SpeedConfig, dev: torch.device, data: torch.Tensor, batch_size: int
) -> Callable[[int], float]:
    """One epoch of the hand-written loop (fused Adam) over ``data``; returns its wall time."""
    step = _pytorch_step(cfg, dev, data.shape[1], fused=True)

    def run(number: int) -> float:
        order = epoch_order(cfg.seed, number, len(data)).to(dev)
        total = torch.zeros((), device=dev)
        for index in order.split(batch_size):
            total += step(data[index])
        return total.item()  # the epoch's loss, read once

    def epoch(number: int) -> float:
        return _timed(dev, run, number)

    return epoch


def _time_epochs(
    cfg: SpeedConfig,
    dev: torch.device,
    data: torch.Tensor,
    batch_size: int,
    pairs: dict[str, Callable[[], tuple[Any, Any]]] | None = None,
    rounds: int | None = None,
    task: str = "epoch",
) -> list[dict[str, object]]:
    """Whole ``fit`` epochs of each pair in ``pairs`` (default: lvmkit's VAE and the same
    networks as a user's plain-function pair), each alternating with a hand-written loop (fused
    Adam) of its own. Besides the median epoch, ``setup_s`` (call to first step) and
    ``ratio_with_setup``: fit's whole wall time over the hand-written loop's for the same
    epochs, its first included — what a short run costs."""
    rounds = cfg.epoch_rounds if rounds is None else rounds
    data_dim = data.shape[1]
    pairs = pairs or {
        "lvmkit": lambda: _networks(cfg, data_dim, dev),
        "lvmkit_user_pair": lambda: _plain_pair(cfg, data_dim, dev),
    }
    rows: list[dict[str, object]] = []
    for name, make in pairs.items():
        pyro.clear_param_store()
        others = {"pytorch_fused": _pytorch_epoch(cfg, dev, data, batch_size)}  # seeds the RNG
        numpyro_note = _add_numpyro_epoch(others, cfg, dev, data, batch_size)
        clock = _Alternate(dev, others)
        model, guide = make()
        _synchronize(dev)
        called = time.perf_counter()
        result = fit(
            model, guide, data, epochs=1 + rounds, batch_size=batch_size, lr=cfg.lr,
            device=dev, seed=cfg.seed, progress=False, callbacks=[clock],
        )  # fmt: skip
        _synchronize(dev)
        whole = time.perf_counter() - called - clock.spent_on_others()
        floor = statistics.median(clock.other["pytorch_fused"])
        numpyro = (
            statistics.median(clock.other["numpyro_jit"]) if "numpyro_jit" in others else math.nan
        )
        note = f"median of {rounds} epochs of {len(data)} points, alternating"
        series = [(f"{other} ({name})", values) for other, values in clock.other.items()]
        for contender, values in [*series, (name, clock.ours)]:
            median = statistics.median(values)
            row: dict[str, object] = {
                "task": task,
                "batch_size": batch_size,
                "contender": contender,
                "examples_per_s": len(data) / median,
                "epoch_s": median,
                "ratio_to_pytorch_fused": median / floor,
                "ratio_to_numpyro": median / numpyro,
                "note": note,
            }
            if contender.startswith("numpyro_jit"):
                row["first_epoch_s"] = clock.other_all["numpyro_jit"][0]  # its jit included
            if contender == name:
                row.update(
                    setup_s=clock.started - called,
                    first_epoch_s=clock.first_epoch,
                    compile_s=result.compile_s,
                    ratio_with_setup=whole / sum(clock.other_all["pytorch_fused"]),
                    note=f"{note}; {'compiled' if result.compiled else 'eager'}",
                )
                if "numpyro_jit" in others:
                    row["ratio_with_setup_to_numpyro"] = whole / sum(clock.other_all["numpyro_jit"])
            rows.append(row)
        if numpyro_note:
            rows.append({"task": task, "batch_size": batch_size, "contender": "numpyro_jit",
                         "note": numpyro_note})  # fmt: skip
    return rows


def _add_numpyro_epoch(
    others: dict[str, Callable[[int], float]],
    cfg: SpeedConfig,
    dev: torch.device,
    data: torch.Tensor,
    batch_size: int,
) -> str:
    """Add NumPyro's epoch (the same images in the same order) to ``others``; or say why not."""
    _numpyro_vae, why = _import_numpyro(dev)
    if _numpyro_vae is None:
        return why
    array = data.cpu().numpy()

    def order(number: int):
        return epoch_order(cfg.seed, number, len(array)).numpy()

    run = _numpyro_vae.make_epoch(
        cfg.hidden_dim, cfg.latent_dim, cfg.lr, array, batch_size, cfg.seed, order
    )
    others["numpyro_jit"] = lambda number: _timed(dev, run, number)
    return ""


def _time_overhead(cfg: SpeedConfig) -> list[dict[str, object]]:
    """The ``overhead`` task (see :class:`OverheadConfig`): host microseconds per step of the
    tiny network on the CPU, and the same through whole ``fit`` epochs."""
    o = cfg.overhead
    tiny = replace(
        cfg, hidden_dim=o.hidden_dim, latent_dim=o.latent_dim, warmup_steps=o.warmup_steps,
        timed_steps=o.timed_steps, rounds=o.rounds,
    )  # fmt: skip
    cpu = torch.device("cpu")
    generator = torch.Generator().manual_seed(cfg.seed)
    points = o.epoch_steps * o.batch_size
    data = torch.bernoulli(torch.full((points, o.data_dim), 0.3), generator=generator)
    batch = data[: o.batch_size]

    def step(**options: Any) -> Callable[[], Step]:
        return lambda: _lvmkit_step(tiny, cpu, batch, objective="elbo", **options)

    contenders: dict[str, Callable[[], Step]] = {
        "pytorch": lambda: _pytorch_step(tiny, cpu, o.data_dim, fused=False),
        "pytorch_fused": lambda: _pytorch_step(tiny, cpu, o.data_dim, fused=True),
        "lvmkit": step(compile=True),  # what fit runs on a long run
        "lvmkit_eager": step(compile=False),
        "lvmkit_user_pair": step(compile=None, pair=_plain_pair),  # fit's default, a long run
        "lvmkit_user_pair_eager": step(compile=False, pair=_plain_pair),
        "pyro_svi": lambda: _pyro_svi_step(tiny, cpu, o.data_dim),
    }
    pairs = {
        "lvmkit": lambda: _networks(tiny, o.data_dim, cpu),
        "lvmkit_user_pair": lambda: _plain_pair(tiny, o.data_dim, cpu),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny network: a second thread only adds its own noise
    try:
        rows = _time_steps(tiny, cpu, data, o.batch_size, contenders, task="overhead step")
        rows += _time_epochs(
            tiny, cpu, data, o.batch_size, pairs, rounds=o.epoch_rounds, task="overhead fit"
        )
    finally:
        torch.set_num_threads(threads)
    for row in rows:
        note = f"{o.data_dim}-{o.hidden_dim}-{o.latent_dim} VAE, one CPU thread"
        row["note"] = f"{note}; {row['note']}" if row.get("note") else note
    return rows


def _time_evaluate(cfg: SpeedConfig, dev: torch.device) -> list[dict[str, object]]:
    """``evaluate`` at K = ``eval_samples``: its default (the pass compiled where the evaluation
    repays it; compilation included in its seconds, and said in ``compile_s``), then eagerly."""
    points = cfg.eval_points_cuda if dev.type == "cuda" else cfg.eval_points
    test = load_mnist("test", binarization="static", seed=cfg.seed, limit=points).x
    model, guide = _networks(cfg, test.shape[1], dev)
    evaluate(model, guide, test[:2], num_samples=min(cfg.eval_samples, 20))  # warm-up, imports
    rows = []
    for name, compile in (("lvmkit", None), ("lvmkit_eager", False)):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        tic = time.perf_counter()
        _synchronize(dev)
        scores = evaluate(model, guide, test, cfg.eval_samples, seed=cfg.seed, compile=compile)
        _synchronize(dev)
        seconds = time.perf_counter() - tic
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated(dev) / 2**20
        else:  # the process's peak resident memory so far (Linux reports KiB)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        compiled = scores.attrs["compiled"]
        rows.append(
            {
                "task": f"evaluate K={cfg.eval_samples}",
                "contender": name,
                "seconds": seconds,
                "seconds_per_1000_points": seconds * 1000 / len(test),
                "peak_mem_mib": peak,
                "compile_s": scores.attrs["compile_s"],
                "note": f"{len(test)} test points timed; "
                + ("compiled" if compiled else "eager")
                + ("" if dev.type == "cuda" else "; peak is the process's max RSS"),
            }
        )
    return rows


def _sweep_max_pairs(cfg: SpeedConfig, dev: torch.device) -> list[dict[str, object]]:
    """evaluate's time per (sample, point) pairs per forward pass, to choose DEFAULT_MAX_PAIRS."""
    cuda = dev.type == "cuda"
    points = cfg.sweep_points_cuda if cuda else cfg.sweep_points
    test = load_mnist("test", binarization="static", seed=cfg.seed, limit=points).x
    model, guide = _networks(cfg, test.shape[1], dev)
    rows = []
    for max_pairs in cfg.max_pairs_grid_cuda if cuda else cfg.max_pairs_grid:
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        seconds = _timed(
            dev, evaluate, model, guide, test, cfg.eval_samples, seed=cfg.seed, max_pairs=max_pairs
        )
        default = max_pairs == DEFAULT_MAX_PAIRS.get(dev.type)
        rows.append(
            {
                "task": "evaluate max_pairs",
                "contender": "lvmkit",
                "max_pairs": max_pairs,
                "seconds": seconds,
                "seconds_per_1000_points": seconds * 1000 / len(test),
                "peak_mem_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else math.nan,
                "note": f"K={cfg.eval_samples} on {len(test)} test points"
                + ("; the default" if default else ""),
            }
        )
    return rows


def _synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({torch.get_num_threads()} threads)"
