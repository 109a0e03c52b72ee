"""Memory budgets: estimate what a training step or an evaluation pass needs, and refuse early.

A step that does not fit in memory should fail in a second with advice (a smaller ``batch_size``,
``max_pairs``), not after minutes of swapping or with a CUDA out-of-memory error half-way through
an epoch. The estimates are measured, not guessed: the set-up step of ``fit`` runs with
``torch.autograd.graph.saved_tensors_hooks`` and adds up the tensors autograd keeps for the
backward pass (the activations, which dominate), and evaluation measures the same on a probe pass
of one (sample, point) pair. The budget is what the caller gives (``memory_budget``: bytes or a
string such as ``"4GiB"``), else the memory the device has free (CUDA: ``torch.cuda.mem_get_info``;
CPU: ``MemAvailable`` in ``/proc/meminfo``; no check where neither is known).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from lvmkit.base import check_int

T = TypeVar("T")
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
HEADROOM = 0.9  # of the free memory: leave some for the allocator, the OS and everything else


def parse_budget(value: Any, name: str = "memory_budget") -> int | None:
    """``None``, a positive int of bytes, or a string like ``"512MiB"`` / ``"4 GB"`` → bytes."""
    if value is None:
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"{name} must be bytes (an int) or a size such as '512MiB' or '4GB'; got {value!r}"
            )
        size = int(float(match.group(1)) * _UNITS[unit])
        if size < 1:
            raise ValueError(f"{name} must be at least 1 byte; got {value!r}")
        return size
    return check_int(name, value)


def available(dev: torch.device) -> int | None:
    """Bytes free on ``dev`` now (CUDA: the driver's count; CPU: MemAvailable), or None."""
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def budget_for(value: Any, dev: torch.device) -> tuple[int | None, str]:
    """The budget in bytes and how to name it in a message."""
    given = parse_budget(value)
    if given is not None:
        return given, "memory_budget"
    free = available(dev)
    if free is None:
        return None, ""
    return int(free * HEADROOM), f"{HEADROOM:.0%} of the memory free on {dev.type}"


def measure_saved(fn: Callable[[], T]) -> tuple[T, dict[int, int]]:
    """Run ``fn``; return its result and the tensors autograd saved for backward, as
    ``{storage pointer: bytes}`` (drop the parameters' with :func:`storages`).

    A storage counts with the bytes the saved tensors reach in it (the union of their extents),
    not its whole size: a minibatch sliced from a dataset shares the dataset's storage, and
    counting all of it would charge the whole dataset to every step or (sample, point) pair."""
    extents: dict[int, list[tuple[int, int]]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel() > 0:
            size = tensor.element_size()
            start = int(tensor.storage_offset()) * size
            reach = 1 + sum(
                (int(n) - 1) * int(s) for n, s in zip(tensor.shape, tensor.stride(), strict=True)
            )  # elements from the first to the last one the view touches
            ptr = tensor.untyped_storage().data_ptr()
            extents.setdefault(ptr, []).append((start, start + reach * size))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return result, {ptr: _union_bytes(spans) for ptr, spans in extents.items()}


def _union_bytes(spans: list[tuple[int, int]]) -> int:
    total, reached = 0, 0
    for start, stop in sorted(spans):
        start = max(start, reached)
        if stop > start:
            total += stop - start
            reached = stop
    return total


def storages(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def activation_bytes(saved: dict[int, int], params: Iterable[torch.Tensor]) -> int:
    """Bytes of the saved tensors that are not parameters."""
    own = storages(params)
    return sum(size for ptr, size in saved.items() if ptr not in own)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def fmt(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"  # pragma: no cover


def check_data(data_bytes: int, memory_budget: Any, dev: torch.device) -> None:
    """Refuse data that cannot sit on ``dev`` within the budget."""
    budget, what = budget_for(memory_budget, dev)
    if budget is not None and data_bytes > budget:
        raise ValueError(
            f"the data need {fmt(data_bytes)} on {dev}, more than {what} "
            f"({fmt(budget)}); train on a subset, or on a device with more memory"
        )


def check_step(
    activations: int,
    params: Iterable[torch.Tensor],
    data_bytes: int,
    memory_budget: Any,
    dev: torch.device,
    *,
    batch_size: int,
    num_particles: int,
) -> None:
    """Refuse a step that cannot fit: activations (measured) + parameters, gradients and the
    optimizer's two moments + the data when the budget is the caller's total."""
    budget, what = budget_for(memory_budget, dev)
    fixed = 4 * tensor_bytes(params) + data_bytes
    if budget is None or activations + fixed <= budget:
        return
    # activations grow about linearly with the batch; 10 % margin for what does not scale
    fits = int(0.9 * batch_size * (budget - fixed) / max(activations, 1))
    advice = (
        f"Use batch_size <= {fits} or fewer num_particles"
        if fits >= 1
        else "The parameters and data alone take more than that: use a smaller model or data set"
    )
    raise ValueError(
        f"one training step needs about {fmt(activations + fixed)} on {dev}: "
        f"{fmt(activations)} of activations for a minibatch of {batch_size} × "
        f"{num_particles} particle(s) (measured on the first step), "
        f"{fmt(fixed - data_bytes)} for parameters, gradients and the optimizer's state"
        + (f", {fmt(data_bytes)} of data" if data_bytes else "")
        + f" — more than {what} ({fmt(budget)}). {advice}, or give a larger "
        "memory_budget (nothing was trained)."
    )


# -- the host heap -------------------------------------------------------------------------------
#
# A pass of an evaluation allocates a few tensors of megabytes each (at the default 4,096 pairs,
# 12.5 MB per 784-wide tensor) and frees them. glibc's malloc serves such blocks from its heap once
# its dynamic mmap threshold has risen past them, and whether the freed blocks are reused or the
# heap grows around small objects allocated between them depends on where the kernel placed the
# heap and the mappings next to it (ASLR) and on the order of Python's frees (the hash seed): the
# same evaluation (the default VAE, 1,000 test images, K = 1,000, one thread) peaked anywhere from
# +113 MB to +960 MB in nineteen runs, and at +180 MB every time with ASLR off and a fixed hash
# seed. The live tensors are the same each time; what varies is the free memory the allocator
# keeps resident. :class:`HeapGuard` hands it back to the kernel (``malloc_trim``) whenever the
# process has grown more than twice a pass's measured need since the evaluation began: 646-731 MB
# in fourteen runs (docs/reliability.md), no slower, as a trim (a few milliseconds, and page
# faults when the freed pages are used again) happens only where the process grew.


def resident_bytes() -> int | None:
    """The process's resident memory now (Linux: ``/proc/self/statm``), or None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def _malloc_trim() -> Callable[[int], Any] | None:
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        return getattr(libc, "malloc_trim", None)
    except OSError:  # pragma: no cover - no C library to load
        return None


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TRIM = _malloc_trim()  # glibc's; None elsewhere (macOS, musl): the guard then does nothing
MIN_HEAP_SLACK = 64 * 2**20  # growth tolerated before a trim, at least


class HeapGuard:
    """Keep the host process's resident memory within ``slack`` bytes of where it stood when
    the guard was made, by trimming glibc's heap when it grows past that (see above). For CPU
    work only: a CUDA device's memory is torch's caching allocator's."""

    def __init__(self, slack: int) -> None:
        self.start = resident_bytes()
        self.slack = max(MIN_HEAP_SLACK, int(slack))
        self.trims = 0

    def check(self) -> None:
        if _TRIM is None or self.start is None:
            return
        now = resident_bytes()
        if now is not None and now - self.start > self.slack:
            _TRIM(0)
            self.trims += 1
