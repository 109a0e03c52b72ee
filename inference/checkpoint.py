"""Checkpoints and small run files: atomic, checksummed, and read without unpickling code.

A checkpoint file is a one-line magic string, a one-line JSON header (format, lvmkit version,
payload size, SHA-256 of the payload) and the payload: ``torch.save`` of a plain dict of tensors,
numbers, strings, lists and dicts, loaded back with ``torch.load(..., weights_only=True)``.

Every write goes to a temporary file in the same folder, is flushed to disk, read back and checked
against its checksum, and only then renamed over the old file; the old checkpoint is first kept as
``<name>.prev<suffix>`` (a hard link, so no byte is copied). A crash, a kill or a full disk at any
moment leaves the old checkpoint or the new one, whole and verifiable, never half of one.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from lvmkit.base import __version__

CHECKPOINT_FORMAT = 2  # bump when the layout of the checkpoint dict changes
MAGIC = b"LVMKIT-CHECKPOINT\n"
_MAX_HEADER = 4096


class CheckpointError(ValueError):
    """A file that is not a whole, untampered lvmkit checkpoint of a format this version reads."""


def atomic_write(
    path: str | Path,
    write: Callable[[IO[bytes]], object],
    *,
    verify: Callable[[Path], object] | None = None,
    keep_previous: Path | None = None,
) -> None:
    """Write ``path`` through a temporary file so that a crash leaves the old file or the new one.

    ``write(file)`` fills the temporary file, which is fsynced; ``verify(tmp_path)`` (if given)
    checks it as it lies on disk; with ``keep_previous`` the current ``path`` is first linked there.
    Any failure (a full disk included) removes the temporary file and leaves ``path`` untouched.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if verify is not None:
            verify(tmp)
        if keep_previous is not None and path.exists():
            _replace_with_link(path, keep_previous)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None:
            raise OSError(
                err.errno,
                f"could not write {path} ({os.strerror(err.errno) if err.errno else err}); "
                "the file already there, if any, is untouched",
            ) from err
        raise
    _fsync_dir(path.parent)


def _replace_with_link(source: Path, target: Path) -> None:
    """Make ``target`` another name of ``source``'s data, atomically replacing ``target``."""
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    staging.unlink(missing_ok=True)
    try:
        os.link(source, staging)
    except OSError as err:  # a file system without hard links: copy the bytes instead
        if err.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
            raise
        data = source.read_bytes()
        with open(staging, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(staging, target)


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the renames themselves durable
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is corrupt") from err


def previous_path(path: str | Path) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint it replaced: ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: str | Path, state: dict[str, Any], *, keep_previous: bool = True) -> None:
    """Write ``state`` (plain data and tensors only) to ``path``: checksummed, verified, atomic.

    With ``keep_previous`` the checkpoint being replaced stays readable at :func:`previous_path`.
    """
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    payload = buffer.getvalue()
    header = {
        "format": CHECKPOINT_FORMAT,
        "lvmkit_version": __version__,
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    head = MAGIC + json.dumps(header, sort_keys=True).encode("ascii") + b"\n"

    def write(handle: IO[bytes]) -> None:
        handle.write(head)
        handle.write(payload)

    atomic_write(
        path,
        write,
        verify=lambda tmp: _verified_payload(tmp, tmp.read_bytes()),
        keep_previous=previous_path(path) if keep_previous else None,
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, on the CPU, without running code.

    Raises :class:`CheckpointError` (a ``ValueError``) for a truncated, corrupt or modified file,
    one from an lvmkit whose checkpoint format differs, or one holding anything but tensors and
    plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = _verified_payload(path, path.read_bytes())
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # the checksum matched, so the writer stored something odd
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain data, which lvmkit never "
            f"unpickles: {err}"
        ) from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: the payload is not an lvmkit checkpoint dict")
    return state


def _verified_payload(path: Path, data: bytes) -> bytes:
    if not data.startswith(MAGIC):
        kind = (
            "a plain torch.save file (lvmkit < 0.1 or another tool)"
            if data[:2] == b"PK"
            else ("empty" if not data else "not an lvmkit checkpoint")
        )
        raise CheckpointError(f"{path} is {kind}: it lacks the lvmkit checkpoint header")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + _MAX_HEADER)
    try:
        header = json.loads(data[len(MAGIC) : end]) if end > 0 else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or not {"format", "size", "sha256"} <= set(header):
        raise CheckpointError(f"{path} has a damaged checkpoint header; the file is corrupt")
    if header["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} was written by lvmkit {header.get('lvmkit_version', '?')} in checkpoint "
            f"format {header['format']}; this lvmkit ({__version__}) reads format "
            f"{CHECKPOINT_FORMAT} only. Use the lvmkit version that wrote it."
        )
    payload = data[end + 1 :]
    if len(payload) != header["size"]:
        raise CheckpointError(
            f"{path} is truncated or padded: its header promises {header['size']} bytes of "
            f"data, the file holds {len(payload)}"
        )
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise CheckpointError(
            f"{path} fails its SHA-256 check: the file was corrupted or modified after writing"
        )
    return payload
