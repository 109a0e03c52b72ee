"""The files ``fit`` keeps in a run directory, and the random state a checkpoint must carry.

``config.json`` (settings and metadata), ``history.csv`` and ``checkpoint.pt`` are written
atomically after every epoch; the checkpoint holds parameters, optimizer state, history and every
random state (torch, CUDA, numpy, ``random``), so a resumed run continues bit for bit.
"""

from __future__ import annotations

import platform
import random
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch

from lvmkit.inference import __version__
from lvmkit.inference.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
    write_json,
)

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.csv"
CONFIG_FILE = "config.json"
_RESUMABLE = ("objective", "num_particles", "batch_size", "lr", "seed", "num_points")


def history_columns(with_val: bool) -> list[str]:
    cols = ["epoch", "train_loss", "val_elbo", "seconds", "examples_per_s"]
    return cols if with_val else [c for c in cols if c != "val_elbo"]


def _rng_state(dev: torch.device) -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": list(random.getstate()[1]),
    }
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


def _set_rng_state(state: dict[str, Any], dev: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    random.setstate((3, tuple(state["python"]), None))
    if dev.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], dev)


class RunDir:
    """The files ``fit`` keeps in a run directory."""

    def __init__(self, path: str | Path, *, resume: bool) -> None:
        self.path = Path(path)
        self.settings: dict[str, Any] = {}
        self.checkpoint = self.path / CHECKPOINT_FILE
        if resume and not self.checkpoint.is_file():
            raise FileNotFoundError(f"resume=True but {self.checkpoint} does not exist")
        if not resume and self.checkpoint.exists():
            raise FileExistsError(
                f"{self.path} already holds a run ({CHECKPOINT_FILE}); pass resume=True to "
                "continue it, or choose another run_dir (nothing was overwritten)"
            )

    def start(self, settings: dict[str, Any], metadata: dict[str, Any] | None) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        config = {
            "lvmkit_version": __version__,
            "fit": settings,
            "metadata": metadata or {},
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pyro": pyro.__version__,
        }
        try:
            write_json(self.path / CONFIG_FILE, config)
        except TypeError as err:
            raise TypeError(f"metadata must be JSON-serialisable: {err}") from err

    def restore(self, params, optimizer, settings, dev) -> tuple[list[dict[str, float]], int]:
        state = load_checkpoint(self.checkpoint)
        saved = state["settings"]
        changed = {
            k: (saved.get(k), settings[k]) for k in _RESUMABLE if saved.get(k) != settings[k]
        }
        if changed:
            diff = ", ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"cannot resume {self.path} with different settings ({diff})")
        self.settings = saved
        names, shapes = (
            list(state["params"]),
            {k: tuple(v.shape) for k, v in state["params"].items()},
        )
        expected = {k: tuple(v.shape) for k, v in params.items()}
        if shapes != expected:
            raise ValueError(
                f"checkpoint {self.checkpoint} belongs to another model: its parameters are "
                f"{_describe(shapes)}, this model/guide has {_describe(expected)}"
            )
        with torch.no_grad():
            for name in names:
                params[name].copy_(state["params"][name])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"], dev)
        return [dict(row) for row in state["history"]], int(state["epoch"])

    def save(self, epoch, rows, params, optimizer, dev) -> None:
        save_checkpoint(
            self.checkpoint,
            {
                "epoch": epoch,
                "settings": self.settings,
                "params": {k: v.detach().cpu() for k, v in params.items()},
                "optimizer": optimizer.state_dict(),
                "rng": _rng_state(dev),
                "history": rows,
            },
        )
        columns = history_columns("val_elbo" in rows[0])
        atomic_write_text(
            self.path / HISTORY_FILE, pd.DataFrame(rows, columns=columns).to_csv(index=False)
        )


def _describe(shapes: dict[str, tuple[int, ...]]) -> str:
    items = list(shapes.items())
    text = ", ".join(f"{k} {list(v)}" for k, v in items[:4])
    return f"{len(items)} tensors ({text}{', …' if len(items) > 4 else ''})"
