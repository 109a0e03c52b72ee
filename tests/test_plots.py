"""lvmkit.plots: every figure draws headless and saves a PNG; decoding matches the model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyro
import pytest
import torch

import lvmkit
from conftest import assert_close
from lvmkit import plots

PNG = b"\x89PNG\r\n\x1a\n"
SHAPE = (4, 4)


@pytest.fixture
def pair():
    pyro.set_rng_seed(0)
    return lvmkit.build_vae(lvmkit.VAEConfig(data_dim=16, latent_dim=3, hidden_dims=(8,)))


def _x(n: int = 40) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, 16), 0.3), generator=torch.Generator().manual_seed(0))


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG


def test_decoder_means_are_the_decoders_mean(pair):
    model, _ = pair
    z = torch.randn(5, 3)
    with torch.no_grad():
        expected = model.likelihood(z).mean
    assert_close(plots.decoder_means(model, z), expected)


def test_every_figure_is_drawn_and_saved(pair, tmp_path):
    model, guide = pair
    x = _x()
    labels = np.arange(40) % 4
    history = pd.DataFrame({"epoch": [1, 2], "train_loss": [9.0, 8.0], "val_elbo": [-9.5, -8.2]})
    frame = pd.DataFrame(
        {
            "latent_dim": [2, 5, 10],
            "test_elbo": [-99, -95, -94],
            "test_log_likelihood": [-97, -92, -91],
        }
    )
    scores = lvmkit.evaluate(model, guide, x[:10], 30)
    drawn = {
        "grid": plots.image_grid(x, SHAPE, path=tmp_path / "grid.png"),
        "rows": plots.image_rows({"a": x[:3], "b": x[3:5]}, SHAPE, path=tmp_path / "rows.png"),
        "samples": plots.sample_grid(model, 9, image_shape=SHAPE, path=tmp_path / "samples.png"),
        "recon": plots.reconstructions(
            model, guide, x, image_shape=SHAPE, path=tmp_path / "recon.png"
        ),
        "scatter": plots.latent_scatter(guide, x, labels, path=tmp_path / "scatter.png"),
        "traversal": plots.latent_traversal(
            model, image_shape=SHAPE, path=tmp_path / "traversal.png"
        ),
        "interp": plots.interpolation(
            model, guide, x[:2], x[2:4], steps=5, image_shape=SHAPE, path=tmp_path / "interp.png"
        ),
        "elbo": plots.elbo_curve(history, path=tmp_path / "elbo.png"),
        "latent_dim": plots.bound_vs_latent_dim(frame, path=tmp_path / "latent_dim.png"),
        "khat": plots.khat_plot(scores["pareto_k"], path=tmp_path / "khat.png"),
    }  # fmt: skip
    for name, fig in drawn.items():
        assert fig.axes, name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["grid.png", "rows.png", "samples.png", "recon.png", "scatter.png", "traversal.png",
         "interp.png", "elbo.png", "latent_dim.png", "khat.png"]
    )  # fmt: skip
    assert all(_is_png(p) for p in tmp_path.iterdir())
    # a 3-D latent space is shown on its first two principal components
    assert drawn["scatter"].axes[0].get_xlabel() == "principal component 1"
    # the traversal has a row per unit, each with 9 pictures
    assert len([ax for ax in drawn["traversal"].axes if ax.images]) == 3 * 9


def test_khat_plot_accepts_inference_data_and_arrays(pair, tmp_path):
    model, guide = pair
    idata = lvmkit.to_inference_data(model, guide, _x(6), num_samples=25)
    plots.khat_plot(idata.sample_stats["pareto_k"], path=tmp_path / "a.png")
    plots.khat_plot(np.array([0.1, 0.8, 0.3]), path=tmp_path / "b.png")
    assert _is_png(tmp_path / "a.png") and _is_png(tmp_path / "b.png")
    fig = plots.khat_plot(np.array([0.1, np.inf, np.nan, 0.3]))  # PSIS gives inf for flat tails
    assert "2 not finite, drawn at 2.00" in fig.axes[0].get_title()


def test_bad_inputs_name_the_argument(pair):
    model, guide = pair
    with pytest.raises(ValueError, match=r"image_shape \(5, 5\)"):
        plots.image_grid(_x(2), (5, 5))
    with pytest.raises(ValueError, match=r"units must be latent units in \[0, 3\); got \[7\]"):
        plots.latent_traversal(model, units=[7], image_shape=SHAPE)
    with pytest.raises(ValueError, match="history must be a fit history"):
        plots.elbo_curve(pd.DataFrame({"x": [1]}))
    with pytest.raises(ValueError, match="x_from and x_to must have the same shape"):
        plots.interpolation(model, guide, _x(2), _x(3), image_shape=SHAPE)
    with pytest.raises(ValueError, match="frame has no columns"):
        plots.bound_vs_latent_dim(pd.DataFrame({"latent_dim": [1]}))
    with pytest.raises(ValueError, match=r"labels must have one entry per code \(40\)"):
        plots.latent_scatter(guide, _x(), labels=[1, 2])
    plots.latent_scatter(guide, _x())  # no labels: one colour
    with pytest.raises(ValueError, match="pass latent_dim="):
        plots.sample_grid(lambda batch_size=None, x=None: None, 4)
