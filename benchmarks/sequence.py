"""``lvmkit bench sequence``: sequence models on Bach's chorales, built from music21's corpus
(:mod:`lvmkit.music`): setting ``chorales``, the four voices as piano rolls (JSB's frame rate and
88 keys, Bernoulli frames); setting ``melodies``, the soprano lines as tokens (categorical).

Contenders (each trained by ``lvmkit.fit`` and scored by ``lvmkit.evaluate``; yours join with
``--contender``, and are told the setting's data in ``task.data`` and ``task.extra
["likelihood"]``; on the melodies the recurrent ones run, not the DMM):

- ``recurrent, no z``: the recurrent decoder alone (no code) — the baseline that says whether z
  helps at all;
- ``recurrent VAE``: SentenceVAE's model, plain ELBO;
- ``+ KL annealing``: the KL weight rising 0 → 1 over the first quarter of training (Bowman et
  al.);
- ``+ annealing + frame dropout``: and a quarter of the decoder's inputs dropped (word dropout);
- ``conductor (MusicVAE)``: the hierarchical decoder (4-frame bars = one 4/4 bar), annealed;
- ``deep Markov model``: Krishnan et al.'s DMM with its structured guide.

Per contender, on the test chorales: negative log-likelihood per frame (importance sampling, K
samples; the exact likelihood for the decoder without z), −ELBO per frame, KL(q ‖ p) per
sequence (E_q[log q(z | x) − log p(z)]), active units (Burda et al.'s covariance test; the DMM's
codes are per frame, so none there), and the decoder's NLL per frame with z drawn from the prior
over its NLL with z from the posterior (``prior_nll_ratio``: 1 = the code carries nothing, the
decoder does as well without it — posterior collapse). Learning curves: the validation −ELBO
per frame each epoch. Published JSB numbers (nats per frame) beside ours in the docs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine

from lvmkit.base import check_choice
from lvmkit.benchmarks import contenders as cs
from lvmkit.benchmarks.contenders import Contender, Curve, Task
from lvmkit.inference import KLSchedule, active_units, evaluate, summarize
from lvmkit.inference.calls import as_data
from lvmkit.inference.devices import pair_placement
from lvmkit.inference.kernel import is_sample, paired_traces, site_log_prob
from lvmkit.inference.layout import find_layout
from lvmkit.inference.params import eval_mode, param_scope
from lvmkit.inference.weights import scoring
from lvmkit.models import DMMConfig, RecurrentVAEConfig
from lvmkit.pairs import build_dmm, build_recurrent_vae

BASELINE = "recurrent, no z"
PLAIN = "recurrent VAE"
ANNEALED = "+ KL annealing"
DROPOUT = "+ annealing + frame dropout"
CONDUCTOR = "conductor (MusicVAE)"
DMM = "deep Markov model"

# Published test NLL per frame on JSB Chorales (nats; their split, their training lengths).
NADE = "RNN-NADE (Boulanger-Lewandowski et al. 2012)"
PUBLISHED = {
    NADE: 5.56,
    "STORN (Bayer & Osendorfer 2014)": 6.91,
    "DMM-Aug (Krishnan et al. 2017, a bound)": 6.388,
}


@dataclass(frozen=True)
class SequenceProtocol:
    n_train: int | None  # chorales trained on (None: the whole train split)
    n_test: int | None
    epochs: int
    num_samples: int  # K of the importance-sampled NLL
    batch_size: int = 20
    lr: float = 3e-3  # 1e-3 sat ~2 nats/frame higher after 10 epochs (dev runs, 2026-11-29)
    clip_norm: float = 10.0
    latent_dim: int = 16
    hidden_dim: int = 128
    seed: int = 0

    def describe(self, n_train: int, n_test: int) -> str:
        return (
            f"{n_train} train / {n_test} test chorales, {self.epochs} epochs, Adam lr "
            f"{self.lr:g}, batch {self.batch_size}, gradient norm clipped at {self.clip_norm:g}, "
            f"K = {self.num_samples}"
        )


PROFILES = {
    "quick": SequenceProtocol(
        n_train=24, n_test=8, epochs=2, num_samples=4, latent_dim=4, hidden_dim=16
    ),
    "full": SequenceProtocol(n_train=None, n_test=None, epochs=120, num_samples=100),
}


def _likelihood(task: Task) -> str:
    return task.extra.get("likelihood", "bernoulli")


def _rvae(**options: Any):
    def factory(task: Task) -> Contender:
        extra = dict(task.extra)
        hidden = extra.get("hidden_dim", 128)
        cfg = RecurrentVAEConfig(
            task.data_dim,
            likelihood=_likelihood(task),
            latent_dim=task.latent_dim or 16,
            hidden_dim=hidden,
            embed_dim=hidden // 2,
            frame_dropout=options.get("frame_dropout", 0.0),
            bar_length=options.get("bar_length"),
        )
        model, guide = build_recurrent_vae(cfg)
        fit_options = {}
        if options.get("anneal"):
            warmup = max(1.0, extra["epochs"] / 4)
            fit_options["kl_schedule"] = KLSchedule(warmup_epochs=warmup)
        return Contender(model, guide, fit_options=fit_options)

    return factory


def _baseline(task: Task) -> Contender:
    hidden = task.extra.get("hidden_dim", 128)
    cfg = RecurrentVAEConfig(
        task.data_dim,
        likelihood=_likelihood(task),
        latent_dim=0,
        hidden_dim=hidden,
        embed_dim=hidden // 2,
    )
    return Contender(*build_recurrent_vae(cfg))


def _dmm(task: Task) -> Contender:
    hidden = task.extra.get("hidden_dim", 128)
    cfg = DMMConfig(
        task.data_dim,
        latent_dim=task.latent_dim or 16,
        emission_dim=hidden // 2,
        transition_dim=hidden,
        rnn_dim=hidden,
    )
    return Contender(*build_dmm(cfg))


BUILTINS = {
    BASELINE: _baseline,
    PLAIN: _rvae(),
    ANNEALED: _rvae(anneal=True),
    DROPOUT: _rvae(anneal=True, frame_dropout=0.25),
    CONDUCTOR: _rvae(anneal=True, bar_length=4),
    DMM: _dmm,
}
# the soprano lines as tokens: the recurrent models (the DMM's emissions are Bernoulli frames)
MELODY_BUILTINS = (BASELINE, PLAIN, DROPOUT, CONDUCTOR)
SETTINGS = {
    "chorales": (
        "pianoroll",
        "x: (N, T, 88) 0/1 piano rolls, one frame per quarter note, zero past each chorale's "
        "end; lengths: (N,) frames",
    ),
    "melodies": (
        "melody",
        "x: (N, T) soprano tokens, one per quarter note (0 rest, 1 hold, 2 + pitch - 57 a new "
        "note), zero past each end; lengths: (N,) frames",
    ),
}


def run(
    profile: str = "full",
    *,
    device: str = "cpu",
    figures_dir: str | Path | None = None,
    protocol: SequenceProtocol | None = None,
    contenders=None,
    only: str | None = None,
    settings: tuple[str, ...] | None = None,
) -> pd.DataFrame:
    """Train and score every contender on the chorales' piano rolls ("chorales") and on their
    soprano lines as tokens ("melodies"); one row per setting and contender."""
    p = protocol or PROFILES[check_choice("profile", profile, PROFILES)]
    wanted = list(SETTINGS) if settings is None else list(settings)
    for name in wanted:
        check_choice("settings", name, SETTINGS)
    chosen = cs.select("sequence", BUILTINS, contenders, only, reserved=tuple(PUBLISHED))
    rows, curves = [], []
    for setting in wanted:
        train, valid, test = _data(setting, p)
        task = Task(
            "sequence",
            setting,
            train.data_dim,
            ("x", "lengths"),
            SETTINGS[setting][1],
            latent_dim=p.latent_dim,
            num_train=len(train),
            seed=p.seed,
            extra={
                "hidden_dim": p.hidden_dim,
                "epochs": p.epochs,
                "likelihood": "bernoulli" if setting == "chorales" else "categorical",
            },
        )
        probe = [train.take(3).data]
        models = {}
        per_frame_val = len(valid) / valid.num_frames
        for name, factory in chosen.items():
            if setting == "melodies" and name in BUILTINS and name not in MELODY_BUILTINS:
                continue
            pyro.set_rng_seed(p.seed)
            contender = cs.build(name, factory, task, probe)
            curve = Curve(
                from_history={"val_elbo:validation -ELBO per frame": _scaled(-per_frame_val)}
            )
            options = dict(
                epochs=p.epochs,
                batch_size=p.batch_size,
                lr=p.lr,
                clip_norm=p.clip_norm,
                seed=p.seed,
                device=device,
                validation_data=valid.data,
            )
            _, per_epoch = cs.train(
                contender, task, train.data, protocol=options, callbacks=[curve]
            )
            rows.append(
                {
                    "setting": setting,
                    "contender": name,
                    **score(contender, test, p.num_samples, p.seed),
                    "epochs": p.epochs,
                    "seconds_per_epoch": per_epoch,
                }
            )
            curves.append(curve.frame(setting=setting, contender=name))
            models[name] = contender
        if setting == "chorales":
            for source, nll in PUBLISHED.items():
                rows.append({"setting": setting, "contender": source, "nll_per_frame": nll})
        if figures_dir is not None:
            _figures(setting, models, test, Path(figures_dir), p)
    frame = pd.DataFrame(rows)
    curves_frame = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    frame.attrs["curves"] = curves_frame
    frame.attrs["protocol"] = p.describe(len(train), len(test))
    if figures_dir is not None and not curves_frame.empty:
        cs.curve_figure(
            curves_frame,
            "validation -ELBO per frame",
            label_of=lambda row: f"{row['setting']}: {row['contender']}",
            lines={"RNN-NADE, JSB test NLL": PUBLISHED[NADE]},
            ylabel="validation −ELBO per frame (nats)",
            title=f"per epoch ({p.epochs} epochs)",
            path=Path(figures_dir) / "sequence-curves.png",
        )
    return frame


def _data(setting: str, p: SequenceProtocol):
    from lvmkit.music import load_chorales

    form = SETTINGS[setting][0]
    train, valid, test = (load_chorales(s, form=form) for s in ("train", "valid", "test"))
    if p.n_train is not None:
        train, valid = train.take(p.n_train), valid.take(max(2, p.n_train // 3))
    if p.n_test is not None:
        test = test.take(p.n_test)
    return train, valid, test


def _scaled(factor: float):
    return lambda value: factor * value


def score(contender: Contender, test: Any, num_samples: int, seed: int) -> dict[str, float]:
    """The table's numbers for one trained contender on ``test`` (a :class:`lvmkit.music.
    Sequences`)."""
    model, guide = contender.model, contender.guide
    frames = test.num_frames
    table = evaluate(model, guide, test.data, num_samples, seed=seed, progress=False)
    s = summarize(table)
    n = len(test)
    terms = _posterior_terms(model, guide, test.data, seed)
    out = {
        "nll_per_frame": -s.log_likelihood * n / frames,
        "neg_elbo_per_frame": -s.elbo * n / frames,
        "kl_per_sequence": float(terms["kl"].mean()),
        "active_units": math.nan,
        "prior_nll_ratio": float(terms["recon_prior"].sum() / terms["recon"].sum()),
        "frac_k_above_0_7": s.frac_pareto_k_above_0_7,
        "K": num_samples,
        "n_test": n,
        "test_frames": frames,
    }
    if "z" in terms["latents"]:
        out["active_units"] = active_units(guide, test.data).count
    if not terms["latents"]:  # nothing latent: the likelihood is exact (equal weights: no k̂
        # to speak of), and there is no code to collapse
        out["kl_per_sequence"] = out["prior_nll_ratio"] = out["frac_k_above_0_7"] = math.nan
    return out


def _posterior_terms(model, guide, data, seed: int, *, draws: int = 8) -> dict[str, Any]:
    """Per sequence, averaged over ``draws`` draws: ``recon`` E_q[log p(x | z)] and ``kl``
    E_q[log q(z | x) − log p(z)] (z from the guide), and ``recon_prior`` E_p(z)[log p(x | z)]
    (z from the prior); ``latents``, the guide's latent sites. Scored by the evaluation kernel
    (:mod:`lvmkit.inference.weights`): per data point, masks honoured, unscaled densities."""
    device = pair_placement(model, guide, None).device
    values = as_data(data, model).to(device)
    n = values.check_sliceable()
    totals = {k: torch.zeros(1, n, device=device) for k in ("recon", "kl", "recon_prior")}
    latents: set[str] = set()
    with scoring(model, guide, seed), pyro.validation_enabled(False), poutine.block():
        layout = find_layout(model, guide, values, vectorize=False)
        zero = totals["kl"]

        def observed(trace) -> torch.Tensor:
            sites = [s for s in trace.nodes.values() if is_sample(s) and s["is_observed"]]
            return sum((site_log_prob(s, layout, 1, n) for s in sites), torch.zeros_like(zero))

        for _ in range(draws):
            traces = paired_traces(model, guide, values)
            latents = traces.latents
            totals["recon"] += observed(traces.model)
            for name in (m for m in latents if m in traces.model.nodes):
                q, p = traces.guide.nodes[name], traces.model.nodes[name]
                totals["kl"] += site_log_prob(q, layout, 1, n) - site_log_prob(p, layout, 1, n)
            totals["recon_prior"] += observed(
                poutine.trace(model).get_trace(*values.args, **values.kwargs)
            )
    return {**{k: (v[0] / draws).cpu() for k, v in totals.items()}, "latents": latents}


def _figures(setting: str, models: dict[str, Contender], test, out: Path, p) -> None:
    from lvmkit import music, plots

    out.mkdir(parents=True, exist_ok=True)
    length = int(test.lengths[0])
    first = test.x[0, :length]
    samples = {"a test chorale" if setting == "chorales" else "a test soprano line": first}
    for name in (PLAIN, DROPOUT, CONDUCTOR, DMM):
        if name in models:
            model, guide = models[name].model, models[name].guide
            with torch.no_grad(), eval_mode(model), param_scope(model, guide, publish=False):
                pyro.set_rng_seed(p.seed)
                samples[f"sampled: {name}"] = model(length=length, batch_size=1)[0]
    form = SETTINGS[setting][0]
    for name, sample in samples.items():  # to listen to
        if name.startswith("sampled"):
            slug = re.sub(r"[^a-z0-9]+", "-", name.split(": ")[1].lower()).strip("-")
            music.to_midi(sample, out / f"sequence-{setting}-{slug}.mid", form=form)
    if form == "melody":  # tokens drawn as a one-voice roll
        samples = {k: _melody_roll(v) for k, v in samples.items()}
    plots.piano_rolls(samples, path=out / f"sequence-{setting}-samples.png")
    if setting == "chorales" and DROPOUT in models and len(test) >= 2:
        contender = models[DROPOUT]
        frames = interpolate(contender.model, contender.guide, test.take(2), steps=5)
        plots.piano_rolls(frames, path=out / "sequence-chorales-interpolation.png")


def _melody_roll(tokens: torch.Tensor) -> torch.Tensor:
    from lvmkit import music

    roll = torch.zeros(len(tokens), music.NUM_KEYS)
    for t, pitch in enumerate(music.melody_to_pitches(tokens)):
        if pitch is not None:
            roll[t, pitch - music.LOWEST_KEY] = 1
    return roll


def interpolate(model, guide, pair, *, steps: int = 5) -> dict[str, torch.Tensor]:
    """Decode codes on the line between two sequences' posterior means (greedy: each frame's
    most probable keys fed back), ``steps`` points from the first to the second."""
    with torch.no_grad(), eval_mode(model, guide), param_scope(model, guide, publish=False):
        loc, _ = guide.encode(pair.x, pair.lengths)
        length = int(pair.lengths.max())
        out = {}
        for i, w in enumerate(np.linspace(0, 1, steps)):
            z = (1 - w) * loc[0:1] + w * loc[1:2]
            out[f"{i}: w = {w:.2f}"] = model.generate(z, 1, length, greedy=True)[0]
    return out


__all__ = ["BUILTINS", "PROFILES", "PUBLISHED", "SequenceProtocol", "interpolate", "run", "score"]
