"""Small data sets with known truth, for the mixture and nonlinear-model benchmarks.

Every generator takes a ``seed`` and returns the same draw for the same seed.

- :func:`make_mixture`: a Gaussian mixture with given weights, means and covariances (labels =
  the true components);
- :func:`make_ring`: the seeds' ring, x = g(z) + ε with g(z) = z/10 + z/‖z‖, z ~ N(0, I₂);
- :func:`make_spiral`: a 1-D-latent curve in 2-D, x = (t cos 3t, t sin 3t)/3 + ε, t ~ U(0.5, 3);
- :func:`make_moons`: scikit-learn's two moons;
- :func:`load_iris`, :func:`load_digits`: scikit-learn's bundled data (no download),
  standardised; digits projected on their first principal components.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from lvmkit.base import check_float, check_int

if TYPE_CHECKING:
    from lvmkit.inference.feeds import Source


@dataclass(frozen=True)
class Labelled:
    """Points ``x`` (n, D), float32, and their true labels ``y`` (n,) (−1 where none)."""

    x: np.ndarray
    y: np.ndarray
    name: str

    def split(self, train_fraction: float, seed: int) -> tuple[Labelled, Labelled]:
        """A seeded random split into train and held-out parts."""
        order = np.random.default_rng(seed).permutation(len(self.x))
        cut = round(train_fraction * len(self.x))
        a, b = order[:cut], order[cut:]
        return (
            Labelled(self.x[a], self.y[a], f"{self.name}/train"),
            Labelled(self.x[b], self.y[b], f"{self.name}/test"),
        )


def make_mixture(
    n: int, weights, means, covariances, *, seed: int = 0, name: str = "mixture"
) -> Labelled:
    """``n`` draws from Σ_k w_k N(μ_k, Σ_k); ``covariances`` (K, D, D), or (K, D) diagonals."""
    check_int("n", n)
    w = np.asarray(weights, dtype=np.float64)
    mu = np.asarray(means, dtype=np.float64)
    cov = np.asarray(covariances, dtype=np.float64)
    if w.ndim != 1 or np.any(w < 0) or not np.isclose(w.sum(), 1.0):
        raise ValueError(f"weights must be a probability vector; got {w}")
    if mu.shape[0] != len(w) or mu.ndim != 2:
        raise ValueError(f"means must have shape (K, D) with K={len(w)}; got {mu.shape}")
    if cov.shape == mu.shape:
        cov = np.stack([np.diag(c) for c in cov])
    if cov.shape != (len(w), mu.shape[1], mu.shape[1]):
        raise ValueError(f"covariances must have shape (K, D, D) or (K, D); got {cov.shape}")
    rng = np.random.default_rng(seed)
    y = rng.choice(len(w), size=n, p=w)
    chol = np.linalg.cholesky(cov)
    x = mu[y] + np.einsum("nij,nj->ni", chol[y], rng.standard_normal((n, mu.shape[1])))
    return Labelled(x.astype(np.float32), y, name)


def ring_map(z: np.ndarray) -> np.ndarray:
    """The seeds' g(z) = z/10 + z/‖z‖: the plane bent onto a ring of radius ≈ 1."""
    return z / 10 + z / np.linalg.norm(z, axis=-1, keepdims=True)


def make_ring(n: int, *, noise: float = 0.05, seed: int = 0) -> Labelled:
    check_int("n", n)
    check_float("noise", noise)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 2))
    x = ring_map(z) + noise * rng.standard_normal((n, 2))
    return Labelled(x.astype(np.float32), np.full(n, -1), "ring")


def make_spiral(n: int, *, noise: float = 0.05, seed: int = 0) -> Labelled:
    check_int("n", n)
    check_float("noise", noise)
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.5, 3.0, n)
    x = np.stack([t * np.cos(3 * t), t * np.sin(3 * t)], axis=1) / 3
    x = x + noise * rng.standard_normal((n, 2))
    return Labelled(x.astype(np.float32), np.full(n, -1), "spiral")


def make_moons(n: int, *, noise: float = 0.05, seed: int = 0) -> Labelled:
    """scikit-learn's two interleaved half circles (a 1-D-latent curve in 2-D, in two pieces);
    labels say which moon."""
    from sklearn.datasets import make_moons as sk_moons

    check_int("n", n)
    check_float("noise", noise)
    x, y = sk_moons(n, noise=noise, random_state=seed)
    return Labelled(x.astype(np.float32), y, "moons")


def _standardise(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean(0)) / x.std(0)).astype(np.float32)


def load_iris() -> Labelled:
    """Fisher's iris: 150 flowers, 4 features (standardised), 3 species."""
    from sklearn.datasets import load_iris as sk_iris

    data = sk_iris()
    return Labelled(_standardise(data.data), data.target, "iris")


def load_digits(n_components: int = 10) -> Labelled:
    """scikit-learn's 1,797 8×8 digits, on their first ``n_components`` principal components
    (standardised), 10 classes."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.decomposition import PCA

    check_int("n_components", n_components)
    data = sk_digits()
    x = PCA(n_components=n_components, random_state=0).fit_transform(data.data)
    return Labelled(_standardise(x), data.target, f"digits-pca{n_components}")


# -- task builders for the conditional and semi-supervised VAEs (torch tensors in, dicts out) --

QUADRANTS_GIVEN = {  # quadrants 0 1 / 2 3 in reading order; which ones the condition shows
    1: (2,),  # bottom left
    2: (2, 3),  # bottom half
    3: (1, 2, 3),  # all but the top left
}


def quadrant_mask(num_given: int, side: int = 28) -> torch.Tensor:
    """Bool image ``(side * side,)``: True on the pixels of the quadrants *not* given."""
    if check_int("num_given", num_given) not in QUADRANTS_GIVEN:
        raise ValueError(f"num_given must be 1, 2 or 3 quadrants; got {num_given}")
    half = side // 2
    hidden = torch.ones(side, side, dtype=torch.bool)
    for q in QUADRANTS_GIVEN[num_given]:
        row, col = divmod(q, 2)
        hidden[row * half : (row + 1) * half, col * half : (col + 1) * half] = False
    return hidden.reshape(-1)


def quadrants(images: torch.Tensor, num_given: int) -> dict[str, torch.Tensor]:
    """The MNIST quadrant-completion task of Sohn et al. (2015): given ``num_given`` quadrants of
    a (binary) image, predict the others.

    Returns ``{"x": images, "c": images with the hidden quadrants set to −1, "mask": True on the
    hidden pixels}`` — the data dict of :class:`lvmkit.models.CVAE` and its baseline, whose
    likelihood scores the hidden pixels only. Quadrants shown (:data:`QUADRANTS_GIVEN`): 1 → the
    bottom left, 2 → the bottom half, 3 → all but the top left.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 2:
        raise ValueError(f"images must be a (N, side²) tensor; got {type(images).__name__}")
    side = round(images.shape[1] ** 0.5)
    if side * side != images.shape[1] or side % 2:
        raise ValueError(f"images must be square with an even side; got {images.shape[1]} pixels")
    hidden = quadrant_mask(num_given, side).to(images.device)
    c = images.clone()
    c[:, hidden] = -1.0
    return {"x": images, "c": c, "mask": hidden.expand(images.shape[0], -1).clone()}


def semi_supervised(
    x: torch.Tensor, y: torch.Tensor, num_labelled: int, *, seed: int = 0
) -> list[Source]:
    """Split ``(x, y)`` into M2's unlabelled and labelled data: two :class:`lvmkit.Source` for
    one :func:`lvmkit.fit`.

    ``num_labelled`` points are drawn with classes balanced (as in Kingma et al., 2014:
    ``num_labelled / C`` per class); the rest are unlabelled. Returns
    ``[Source({"x": unlabelled}, name="unlabelled"), Source({"x": xl, "y": yl},
    name="labelled")]``, both with ``batch_size="auto"``: ``fit``'s ``batch_size`` cuts the
    unlabelled images, and the labelled ones are spread evenly over the same steps, so that each
    image — labelled or not — is seen once an epoch, as in the paper's objective (a sum over the
    whole data set). The labelled images are ``sources[1].data``.

    Example::

        >>> import torch
        >>> x, y = torch.rand(60, 4).round(), torch.arange(60) % 3
        >>> unlabelled, labelled = semi_supervised(x, y, 6)
        >>> len(unlabelled.data["x"]), sorted(labelled.data["y"].tolist())
        (54, [0, 0, 1, 1, 2, 2])
    """
    from lvmkit.inference.feeds import Source

    num_labelled = check_int("num_labelled", num_labelled)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or len(x) != len(y):
        raise ValueError(
            "x and y must be tensors of the same length (images and their labels); got "
            f"{type(x).__name__} and {type(y).__name__}"
            + (f" of lengths {len(x)} and {len(y)}" if hasattr(x, "__len__") else "")
        )
    labels = y.cpu().numpy()
    classes = np.unique(labels)
    if num_labelled % len(classes) or num_labelled >= len(labels):
        raise ValueError(
            f"num_labelled must be a multiple of the {len(classes)} classes and below the "
            f"{len(labels)} points; got {num_labelled}"
        )
    rng = np.random.default_rng(seed)
    per_class = num_labelled // len(classes)
    chosen = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} points, fewer than {per_class}")
        chosen.append(rng.choice(members, per_class, replace=False))
    labelled = np.sort(np.concatenate(chosen))
    unlabelled = np.setdiff1d(np.arange(len(labels)), labelled)
    idx_u, idx_l = torch.from_numpy(unlabelled), torch.from_numpy(labelled)
    return [
        Source({"x": x[idx_u]}, name="unlabelled"),
        Source({"x": x[idx_l], "y": y[idx_l].long()}, name="labelled"),
    ]
