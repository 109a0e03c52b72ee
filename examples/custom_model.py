"""A model/guide pair of your own, end to end: define, train, evaluate, InferenceData, ArviZ.

The seeds' nonlinear latent-variable model on scikit-learn's 8×8 digits (pixels scaled to
[0, 1]):

    z_n ~ N(0, I_2),    x_n | z_n ~ N(f(z_n), σ² I_64),

with f a small network and σ a learned parameter, and an amortized Gaussian guide
q(z_n | x_n) = N(μ(x_n), diag s(x_n)²). Both are plain functions that register their networks
with ``pyro.module`` — nothing lvmkit-specific — and go through the same ``fit`` / ``evaluate`` /
``to_inference_data`` path as the built-in models.

Run it (a minute on 2 CPU cores)::

    python examples/custom_model.py --out example-out

It prints the training history and the held-out scores, and writes ArviZ's summary and plots
(posterior, posterior predictive, Pareto k̂) and lvmkit's latent scatter to ``--out``.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from sklearn.datasets import load_digits
from torch import nn

import lvmkit
from lvmkit import plots

# %% The data: 1,797 digits, 64 grey levels each, split 1,500 / 297.
digits = load_digits()
x_all = torch.tensor(digits.data / 16.0, dtype=torch.float32)
labels = digits.target
x_train, x_test = x_all[:1500], x_all[1500:]
LATENT, PIXELS = 2, 64


# %% The model p(x, z) and the guide q(z | x).
def make_pair():
    decoder = nn.Sequential(nn.Linear(LATENT, 64), nn.Tanh(), nn.Linear(64, PIXELS))
    encoder = nn.Sequential(nn.Linear(PIXELS, 64), nn.Tanh(), nn.Linear(64, 2 * LATENT))

    def model(x):
        pyro.module("decoder", decoder)
        sigma = pyro.param("sigma", torch.tensor(0.3), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT), 1.0).to_event(1))  # event (2,)
            pyro.sample("x", dist.Normal(decoder(z), sigma).to_event(1), obs=x)  # event (64,)

    def guide(x):
        pyro.module("encoder", encoder)
        loc, log_scale = encoder(x).chunk(2, dim=-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))  # batch (N,) event (2,)

    return model, guide


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("example-out"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    # %% Train with SVI (Trace_ELBO), keeping the held-out ELBO per epoch.
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide = make_pair()
    result = lvmkit.fit(
        model,
        guide,
        x_train,
        epochs=args.epochs,
        batch_size=100,
        lr=3e-3,
        validation_data=x_test,
        device="cpu",
        progress=False,
    )
    print(result.history.tail(3).to_string(index=False))
    print(f"learned σ = {float(pyro.param('sigma').detach()):.3f}")

    # %% Evaluate: ELBO, importance-sampled log-likelihood (K = 1000) and Pareto k̂ per image.
    scores = lvmkit.evaluate(model, guide, x_test, num_samples=1000)
    summary = lvmkit.summarize(scores)
    print(
        f"held-out: ELBO {summary.elbo:.2f}, log p(x) ≈ {summary.log_likelihood:.2f} "
        f"± {summary.log_likelihood_se:.2f} nats, k̂ > 0.7 for "
        f"{100 * summary.frac_pareto_k_above_0_7:.0f} % of images"
    )

    # %% To ArviZ: posterior of z per image, replicated images, importance weights with k̂.
    idata = lvmkit.to_inference_data(model, guide, x_test[:100], num_samples=200)
    az = _arviz()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one chain: ArviZ warns about r_hat
        warnings.simplefilter("ignore", FutureWarning)  # plot_khat's note about LOO's ELPDData
        warnings.filterwarnings("ignore", "Passing a dict or None as alias_mapping")  # ArviZ
        table = az.summary(idata, var_names=["z"], coords={"point": [0, 1, 2]}, kind="stats")
        print(table.to_string())
        table.to_csv(args.out / "posterior_summary.csv")
        plt = plots.pyplot()
        az.plot_posterior(idata, var_names=["z"], coords={"point": [0, 1]})
        plt.gcf().savefig(args.out / "posterior.png", dpi=80)
        az.plot_ppc(idata, num_pp_samples=50)
        plt.gcf().savefig(args.out / "ppc.png", dpi=80)
        az.plot_khat(idata.sample_stats["pareto_k"], show_hlines=True)
        plt.gcf().savefig(args.out / "khat.png", dpi=80)
        plt.close("all")

    # %% lvmkit's own figures: the codes coloured by digit, and the training curve.
    plots.latent_scatter(guide, x_all, labels, path=args.out / "latent.png")
    plots.elbo_curve(result.history, path=args.out / "elbo.png")
    print(f"figures in {args.out}/")


def _arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ 0.23's note about its 1.x refactor
        import arviz

    return arviz


if __name__ == "__main__":
    main()
