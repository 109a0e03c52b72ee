"""Figures of a run, drawn headless with matplotlib (imported only when a figure is drawn)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def image_grid(
    images: torch.Tensor, image_shape: tuple[int, ...], path: Path, *, title: str, columns: int = 8
) -> Path:
    """Save rows of ``images`` (N, D) as a grid of ``image_shape`` pictures."""
    plt = _pyplot()
    pictures = images.detach().cpu().reshape(-1, *image_shape).numpy()  # (N, H, W)
    rows = -(-len(pictures) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(columns * 0.9, rows * 0.9 + 0.4), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, picture in zip(axes.flat, pictures, strict=False):
        ax.imshow(np.clip(picture, 0, 1), cmap="gray", vmin=0, vmax=1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def elbo_curve(history: pd.DataFrame, path: Path) -> Path:
    """Training −loss and held-out ELBO per epoch."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(history["epoch"], -history["train_loss"], marker="o", label="train ELBO")
    if "val_elbo" in history:
        ax.plot(history["epoch"], history["val_elbo"], marker="s", label="validation ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats per data point)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
