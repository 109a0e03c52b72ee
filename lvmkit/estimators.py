"""Estimators that train: :class:`GaussianMixture`, a scikit-learn face (``fit``, ``score``,
``score_samples``, ``predict``, ``predict_proba``, ``sample``, ``bic``, ``weights_``, ``means_``,
``covariances_``) on :class:`lvmkit.models.GaussianMixtureModel`, trained by :func:`lvmkit.fit`
and scored by :func:`lvmkit.evaluate` — with scikit-learn's k-means initialisation and the best
of ``n_init`` starts, as users of EM expect. It sits above both the model and the inference it
calls.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch

from lvmkit.base import check_choice, check_float, check_int
from lvmkit.inference import EarlyStopping, evaluate, fit as svi_fit
from lvmkit.inference.calls import as_points
from lvmkit.inference.params import param_scope
from lvmkit.models.gmm import COVARIANCE_TYPES, GaussianMixtureModel, GMMConfig, empty_guide


@torch.no_grad()
def log_joint(model: GaussianMixtureModel, x: torch.Tensor) -> torch.Tensor:
    """log λ_k + log N(x_n; μ_k, Σ_k), shape (K, n), from the model's enumerated Pyro trace."""
    with param_scope(model, empty_guide, publish=False), pyro.validation_enabled(False):
        trace = poutine.trace(poutine.enum(model, first_available_dim=-2)).get_trace(x)
    y: Any = trace.nodes["y"]
    obs: Any = trace.nodes["x"]
    joint = y["fn"].log_prob(y["value"]) + obs["fn"].log_prob(obs["value"])
    return joint.reshape(model.config.n_components, x.shape[0])


def responsibilities(model: GaussianMixtureModel, x: torch.Tensor) -> torch.Tensor:
    """p(y = k | x_n), shape (n, K): the E-step of EM."""
    return torch.softmax(log_joint(model, x), dim=0).T


TOL_PATIENCE = 10  # GaussianMixture(tol=…): steps without a gain above tol before stopping


class GaussianMixture:
    """A Gaussian mixture fitted by SVI on the exact (enumerated) log-likelihood, with the
    interface of ``sklearn.mixture.GaussianMixture``.

    Args:
        n_components: K.
        covariance_type: ``"full"`` or ``"diag"``.
        n_init: starts (each a k-means clustering with its own seed, as scikit-learn's EM
            starts); the best by training log-likelihood is kept.
        max_iter: full-batch Adam steps per start.
        tol: stop a start early once its log-likelihood per point has not risen by more than
            ``tol`` for :data:`TOL_PATIENCE` steps in a row (scikit-learn's EM uses 1e-3 on its
            one-step change; Adam's steps are not monotone, hence the patience). ``None``
            (default): run all ``max_iter`` steps, as the published benchmark did.
        lr: Adam's learning rate.
        reg_covar: added to the covariance diagonals.
        seed: seeds the initialisations and training.
        device: as in :func:`lvmkit.fit`.

    Example::

        >>> import numpy as np
        >>> from lvmkit import GaussianMixture
        >>> rng = np.random.default_rng(0)
        >>> X = np.concatenate([rng.normal(-3, 1, (100, 2)), rng.normal(3, 1, (100, 2))])
        >>> gm = GaussianMixture(2, max_iter=300, seed=0).fit(X)
        >>> sorted(np.round(gm.means_[:, 0]).tolist())
        [-3.0, 3.0]
    """

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        n_init: int = 1,
        max_iter: int = 500,
        tol: float | None = None,
        lr: float = 0.05,
        reg_covar: float = 1e-6,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        self.n_components = check_int("n_components", n_components)
        self.covariance_type = check_choice("covariance_type", covariance_type, COVARIANCE_TYPES)
        self.n_init = check_int("n_init", n_init)
        self.max_iter = check_int("max_iter", max_iter)
        self.tol = check_float("tol", tol, nonnegative=True) if tol is not None else None
        self.lr = check_float("lr", lr)
        self.reg_covar = check_float("reg_covar", reg_covar)
        self.seed = check_int("seed", seed, minimum=0)
        self.device = device
        self.model_: GaussianMixtureModel | None = None

    # -- fitting ----------------------------------------------------------------------------------

    def fit(self, X: Any, y: Any = None) -> GaussianMixture:
        """Fit by SVI with ``TraceEnum_ELBO`` from ``n_init`` k-means starts; return self."""
        x = self._check_X(X, fitting=True)
        best: tuple[float, GaussianMixtureModel, Any] | None = None
        for start in range(self.n_init):
            seed = self.seed + start
            model = self._initial_model(x, seed)
            stop = (
                [EarlyStopping("train_loss", patience=TOL_PATIENCE, min_delta=self.tol)]
                if self.tol is not None
                else []
            )
            result = svi_fit(
                model,
                empty_guide,
                x,
                epochs=self.max_iter,
                batch_size=x.shape[0],
                lr=self.lr,
                objective=pyro.infer.TraceEnum_ELBO(max_plate_nesting=1),
                seed=seed,
                device=self.device,
                progress=False,
                callbacks=stop,
            )
            loss = float(result.history.train_loss.iloc[-1])  # −log-likelihood per point
            if best is None or loss < best[0]:
                best = (loss, model, result.history)
        assert best is not None
        self.model_ = best[1].cpu()
        history = best[2]
        self.n_iter_ = len(history)
        self.lower_bound_ = -best[0]  # training log-likelihood per point at the last step
        # converged: the last TOL_PATIENCE steps raised it by at most tol (1e-3 when tol is None)
        recent = -history.train_loss.to_numpy()[-(TOL_PATIENCE + 1) :]
        gain = float(recent.max() - recent[0]) if len(recent) > TOL_PATIENCE else float("inf")
        self.converged_ = gain <= (self.tol if self.tol is not None else 1e-3)
        return self

    def _initial_model(self, x: torch.Tensor, seed: int) -> GaussianMixtureModel:
        """scikit-learn's default start: k-means (k-means++ seeding, seeded), then the weights,
        means and covariances of its clusters."""
        from sklearn.cluster import KMeans

        data = x.double().numpy()
        kmeans = KMeans(self.n_components, n_init=1, random_state=seed).fit(data)
        centres, labels = kmeans.cluster_centers_, kmeans.labels_
        k, d = self.n_components, data.shape[1]
        weights = np.bincount(labels, minlength=k) / len(data)
        covs = []
        for j in range(k):
            members = data[labels == j]
            if len(members) > d:
                cov = np.cov(members, rowvar=False).reshape(d, d)
            else:  # too few points for a covariance: the data's own
                cov = np.cov(data, rowvar=False).reshape(d, d)
            covs.append(cov + self.reg_covar * np.eye(d))
        cov_arr = np.stack(covs)
        if self.covariance_type == "diag":
            cov_arr = np.stack([np.diag(c) for c in cov_arr])
        config = GMMConfig(k, d, self.covariance_type, num_data=len(data), reg_covar=self.reg_covar)
        return GaussianMixtureModel(
            config,
            weights=torch.as_tensor(np.maximum(weights, 1e-6)),
            means=torch.as_tensor(centres),
            covariances=torch.as_tensor(cov_arr),
        )

    # -- scikit-learn's interface ---------------------------------------------------------------

    def score_samples(self, X: Any) -> np.ndarray:
        """log p(x_n) per point (exact: y summed out by lvmkit's evaluation)."""
        model = self._fitted()
        scores = evaluate(model, empty_guide, self._check_X(X), num_samples=1, device="cpu")
        return scores["log_likelihood"].to_numpy()

    def score(self, X: Any, y: Any = None) -> float:
        """Mean log-likelihood per point, as scikit-learn defines it."""
        return float(self.score_samples(X).mean())

    def predict_proba(self, X: Any) -> np.ndarray:
        return responsibilities(self._fitted(), self._check_X(X)).double().numpy()

    def predict(self, X: Any) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1)

    def sample(self, n_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``n_samples`` draws by ancestral sampling: (X, component labels)."""
        check_int("n_samples", n_samples)
        model = self._fitted()
        with (
            torch.no_grad(),
            param_scope(model, empty_guide, publish=False),
            pyro.validation_enabled(False),
        ):
            trace = poutine.trace(model).get_trace(batch_size=n_samples)
        x: Any = trace.nodes["x"]["value"]
        y: Any = trace.nodes["y"]["value"]
        return x.double().numpy(), y.numpy()

    def bic(self, X: Any) -> float:
        """Bayesian information criterion, −2 log L + p log n (lower is better)."""
        x = self._check_X(X)
        return float(-2 * self.score(x) * x.shape[0] + self._n_parameters() * np.log(x.shape[0]))

    def aic(self, X: Any) -> float:
        x = self._check_X(X)
        return float(-2 * self.score(x) * x.shape[0] + 2 * self._n_parameters())

    @property
    def weights_(self) -> np.ndarray:
        return self._fitted().weights().detach().double().numpy()

    @property
    def means_(self) -> np.ndarray:
        return self._fitted().locs.detach().double().numpy()

    @property
    def covariances_(self) -> np.ndarray:
        return self._fitted().covariances().detach().double().numpy()

    def _n_parameters(self) -> int:
        k, d = self.n_components, self._fitted().config.data_dim
        cov = k * d * (d + 1) // 2 if self.covariance_type == "full" else k * d
        return cov + k * d + k - 1

    def _fitted(self) -> GaussianMixtureModel:
        if self.model_ is None:
            raise ValueError("this GaussianMixture is not fitted yet: call fit(X) first")
        return self.model_

    def _check_X(self, X: Any, *, fitting: bool = False) -> torch.Tensor:
        x = as_points(X, name="X")
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        if x.dim() != 2:
            raise ValueError(f"X must have shape (n_samples, n_features); got {tuple(x.shape)}")
        if fitting and x.shape[0] < self.n_components:
            raise ValueError(
                f"X has {x.shape[0]} points, fewer than n_components={self.n_components}"
            )
        if not fitting and x.shape[1] != self._fitted().config.data_dim:
            raise ValueError(
                f"X has {x.shape[1]} features, but this mixture was fitted on "
                f"{self._fitted().config.data_dim}"
            )
        return x.cpu()


__all__ = ["GaussianMixture", "log_joint", "responsibilities"]
