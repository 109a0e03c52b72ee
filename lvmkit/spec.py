"""What defines a training run of a built-in model on MNIST: :class:`TrainSpec`.

Kept apart from :mod:`lvmkit.runs` so that the ``lvmkit`` command can build its options (and answer
``--help``) without loading torch: the checks import what they need when a spec is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FAMILIES = ("vae",)
TRAIN_BINARIZATIONS = ("dynamic", "static", "none")
MNIST_SPLIT_SIZES = {"train": 50_000, "valid": 10_000, "test": 10_000}  # the classic split


@dataclass(frozen=True)
class TrainSpec:
    """Everything that defines a training run of a built-in model on MNIST."""

    family: str = "vae"  # one of FAMILIES
    likelihood: str = "bernoulli"  # one of lvmkit.models.LIKELIHOODS
    latent_dim: int = 20  # the PyTorch VAE example's 784-400-20 network
    hidden_dims: tuple[int, ...] = (400,)
    activation: str = "relu"
    binarization: str = "dynamic"  # fresh Bernoulli draw per epoch: the NLL-table protocol
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    objective: str = "elbo"  # or "mean_field", "iwae", "rws" (lvmkit.OBJECTIVES)
    num_particles: int = 1  # samples per point in the objective; the K of iwae / rws
    beta: float = 1.0  # weight of the KL term (β-VAE); with warmup_epochs, its final value
    warmup_epochs: float = 0.0  # epochs of linear KL warm-up from 0 to beta
    device: str = "auto"
    seed: int = 0
    eval_samples: int = 5000  # the standard K for published IS log-likelihoods
    eval_points: int | None = None  # None: the whole 10,000-image test set
    train_points: int | None = None  # None: the whole 50,000-image training split
    valid_points: int | None = 2000  # held-out ELBO per epoch on the first images of "valid"
    compile: bool | None = None  # compile the whole step; None: fit decides (runs of 2,000+ steps)
    checkpoint_every: int | None = None  # steps between mid-epoch checkpoints; None: epoch ends
    on_nonfinite: str = "raise"  # or "reduce_lr": halve lr after a NaN and go on (fit's option)
    threads: int | str = "auto"  # CPU threads for torch: "auto" fits the CPUs this process may use

    def kl_schedule(self) -> Any:
        """The KL weighting of this run (a :class:`lvmkit.KLSchedule`; None for the ELBO)."""
        if self.beta == 1.0 and self.warmup_epochs == 0:
            return None
        from lvmkit.inference.annealing import KLSchedule

        return KLSchedule(beta=self.beta, warmup_epochs=self.warmup_epochs)

    def __post_init__(self) -> None:
        from lvmkit.base import check_choice, check_float, check_int, check_sizes
        from lvmkit.inference.objectives import OBJECTIVES
        from lvmkit.inference.train import NONFINITE_POLICIES
        from lvmkit.models import LIKELIHOODS
        from lvmkit.models.mlp import ACTIVATIONS

        check_choice("family", self.family, FAMILIES)
        check_choice("likelihood", self.likelihood, LIKELIHOODS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("binarization", self.binarization, TRAIN_BINARIZATIONS)
        object.__setattr__(self, "hidden_dims", check_sizes("hidden_dims", self.hidden_dims))
        check_choice("objective", self.objective, OBJECTIVES)
        self.kl_schedule()  # checks beta and warmup_epochs
        for name in ("latent_dim", "epochs", "batch_size", "eval_samples", "num_particles"):
            check_int(name, getattr(self, name))
        check_choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        for name in ("eval_points", "train_points", "valid_points", "checkpoint_every"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        for name, split in (("eval_points", "test"), ("train_points", "train"),
                            ("valid_points", "valid")):  # fmt: skip
            value, size = getattr(self, name), MNIST_SPLIT_SIZES[split]
            if value is not None and value > size:
                raise ValueError(
                    f"{name} must be at most {size:,} (the MNIST {split} split's size); got {value}"
                )
        if self.threads != "auto":
            check_int("threads", self.threads)
        check_float("lr", self.lr)
        check_int("seed", self.seed, minimum=0)
        if self.likelihood == "bernoulli" and self.binarization == "none":
            raise ValueError(
                "likelihood='bernoulli' needs binary data: binarization='dynamic' or 'static'; "
                "got binarization='none' (use likelihood='gaussian' for grey levels)"
            )
        if self.likelihood != "bernoulli" and self.binarization == "dynamic":
            raise ValueError(
                f"likelihood={self.likelihood!r} models grey levels: use binarization='none' "
                "(or 'static'); got 'dynamic'"
            )

    @property
    def eval_binarization(self) -> str:
        """Held-out data are binarized once (seeded) unless the run uses grey levels."""
        return "none" if self.binarization == "none" else "static"
