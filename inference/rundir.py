"""The files ``fit`` keeps in a run directory, and the random state a checkpoint must carry.

``config.json`` (settings and metadata) is written when a run starts; ``checkpoint.pt`` and
``history.csv`` after every epoch (and every ``checkpoint_every`` steps), atomically and, for the
checkpoint, checksummed, with the one before kept as ``checkpoint.prev.pt``. The checkpoint is the
source of truth: it holds parameters, optimizer state (with the learning rate), the epoch and step,
that epoch's data order, the running loss, the history and every random state (torch, CUDA, numpy,
``random``), so a resumed run continues bit for bit; ``history.csv`` is rewritten from it on resume.
A ``.lock`` file, held with ``flock`` while ``fit`` runs, keeps a second process out.
"""

from __future__ import annotations

import json
import os
import platform
import random
import socket
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyro
import torch

from lvmkit.base import __version__
from lvmkit.inference.checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
    previous_path,
    save_checkpoint,
    write_json,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs are not guarded
    fcntl = None  # type: ignore[assignment]

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.csv"
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
_RESUMABLE = (
    "objective",
    "num_particles",
    "batch_size",
    "lr",
    "seed",
    "num_points",
    "kl_schedule",
    "world_size",
    "optimizer",
    "scheduler",
    "clip_norm",
)
# what checkpoints older than a setting mean
_SETTING_DEFAULTS = {"world_size": 1, "optimizer": "Adam", "scheduler": None, "clip_norm": None}


def history_columns(with_val: bool, with_kl: bool = False) -> list[str]:
    cols = ["epoch", "train_loss", "kl_weight", "val_elbo", "lr", "seconds", "examples_per_s"]
    drop = {name for name, keep in (("val_elbo", with_val), ("kl_weight", with_kl)) if not keep}
    return [c for c in cols if c not in drop]


def rng_state(dev: torch.device) -> dict[str, Any]:
    """Every random state a training step can touch, as tensors and plain data."""
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


def set_rng_state(state: dict[str, Any], dev: torch.device) -> None:
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


def recorded_threads(run_dir: str | Path) -> int | None:
    """The CPU thread count a run was started with (its ``config.json``), or None."""
    try:
        value = json.loads((Path(run_dir) / CONFIG_FILE).read_text())["fit"]["threads"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class RunDir:
    """The files ``fit`` keeps in a run directory; holds its lock until :meth:`close`."""

    def __init__(self, path: str | Path, *, resume: bool, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only  # another process (rank 0) owns the folder: read, never write
        self.settings: dict[str, Any] = {}
        self.checkpoint = self.path / CHECKPOINT_FILE
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"run_dir {self.path} exists and is not a directory")
        if resume and not self.checkpoint.is_file():
            raise FileNotFoundError(f"resume=True but {self.checkpoint} does not exist")
        if not resume and self.checkpoint.exists():
            raise FileExistsError(
                f"{self.path} already holds a run ({CHECKPOINT_FILE}); pass resume=True to "
                "continue it, or choose another run_dir (nothing was overwritten)"
            )
        self._lock: RunLock | None = None
        if read_only:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = RunLock(self.path)
        self._remove_stale_temporaries()

    def close(self) -> None:
        """Release the lock (the kernel also releases it if the process dies)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of writes a killed process never finished (we hold the lock)."""
        for name in (CHECKPOINT_FILE, previous_path(CHECKPOINT_FILE).name, HISTORY_FILE):
            for stale in self.path.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)

    # -- files --------------------------------------------------------------------------------

    def start(self, settings: dict[str, Any], metadata: dict[str, Any] | None) -> None:
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

    def load(self, settings: dict[str, Any], param_shapes: dict[str, tuple[int, ...]]):
        """Read and check the checkpoint against this run's settings and parameters."""
        try:
            state = load_checkpoint(self.checkpoint)
        except CheckpointError as err:
            raise CheckpointError(f"cannot resume {self.path}: {err}{self._prev_hint()}") from err
        saved = state["settings"]

        def before(key: str) -> Any:
            return saved.get(key, _SETTING_DEFAULTS.get(key))

        if settings.get("seed") is None:  # fit(seed=None): the run goes on with its own seed
            settings = {**settings, "seed": before("seed")}
        changed = {k: (before(k), settings[k]) for k in _RESUMABLE if before(k) != settings[k]}
        if changed:
            diff = ", ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"cannot resume {self.path} with different settings ({diff})")
        shapes = {k: tuple(v.shape) for k, v in state["params"].items()}
        if shapes != param_shapes:
            raise ValueError(
                f"checkpoint {self.checkpoint} belongs to another model: its parameters are "
                f"{_describe(shapes)}, this model/guide has {_describe(param_shapes)}"
            )
        self.settings = saved
        if not self.read_only:
            self.write_history(state["history"])  # it may lag the checkpoint after a kill
        return state

    def _prev_hint(self) -> str:
        prev = previous_path(self.checkpoint)
        try:
            epoch = load_checkpoint(prev)["epoch"]
        except (FileNotFoundError, CheckpointError):
            return ""
        return (
            f". The previous checkpoint {prev.name} (after epoch {epoch}) is intact: move it to "
            f"{CHECKPOINT_FILE} to continue from there"
        )

    def save(self, state: dict[str, Any]) -> None:
        save_checkpoint(self.checkpoint, {**state, "settings": self.settings})
        self.write_history(state["history"])

    def write_history(self, rows: list[dict[str, float]]) -> None:
        if rows:
            columns = history_columns("val_elbo" in rows[0], "kl_weight" in rows[0])
            text = pd.DataFrame(rows, columns=columns).to_csv(index=False)
            atomic_write_text(self.path / HISTORY_FILE, text)


class RunDirInUseError(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock``, shared by nested holders in one process.

    A second process gets a clear error at once (no waiting); a killed holder's lock is released
    by the kernel. Within a process the lock is re-entrant (``lvmkit train`` holds it around
    ``fit``, which takes it again), counted per directory.
    """

    _held: ClassVar[dict[Path, list[int]]] = {}  # resolved dir -> [fd, holders]

    def __init__(self, path: str | Path) -> None:
        self.key = Path(path).resolve()
        held = self._held.get(self.key)
        if held is not None:
            held[1] += 1
            return
        fd = -1
        if fcntl is not None:
            fd = os.open(self.key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 256).decode("utf-8", "replace").strip() or "unknown pid"
                os.close(fd)
                raise RunDirInUseError(
                    f"run_dir {self.key} is in use by a live process ({holder}); wait for it to "
                    "finish or stop it, or choose another run_dir (nothing was touched)"
                ) from None
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._held[self.key] = [fd, 1]

    def release(self) -> None:
        held = self._held[self.key]
        held[1] -= 1
        if held[1] == 0:
            del self._held[self.key]
            if held[0] >= 0:
                os.close(held[0])

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(shapes: dict[str, tuple[int, ...]]) -> str:
    items = list(shapes.items())
    text = ", ".join(f"{k} {list(v)}" for k, v in items[:4])
    return f"{len(items)} tensors ({text}{', …' if len(items) > 4 else ''})"
