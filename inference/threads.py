"""How many CPU threads torch's operators use: ``threads="auto"`` picks what this process can use.

torch starts with one intra-op thread per core of the host: not per CPU this process may use (an
affinity mask, a cgroup quota on a cluster node or in a container), and without regard to other
work. Threads that outnumber the free CPUs wait for each other at every parallel operator, which
costs far more than the parallelism gains. Measured on the 2-core development machine (one fit
epoch of the MNIST VAE, 10,000 images; ``docs/threads.md``):

| beside it | 2 threads | 1 thread |
|---|---:|---:|
| nothing (idle machine) | 14,900 images/s | 11,400 images/s |
| a 1-thread CPU job | 5,200 images/s | 11,500 images/s |
| a 2-thread torch job | 3,400 images/s | 8,500 images/s |

So ``"auto"`` takes the CPUs this process may use, less those other processes keep busy when it
starts (sampled from ``/proc/stat``, this process's own threads not counted), and at least one —
and never lowers or raises a count the user set: ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` in the
environment, or ``torch.set_num_threads`` called after lvmkit was imported. An int sets that many.
``fit``, ``evaluate`` and ``to_inference_data`` apply the choice for their own duration only, and
say once per process what they chose (a log line of the ``"lvmkit"`` logger).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

AUTO = "auto"
_ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_AT_IMPORT = torch.get_num_threads()  # torch's own default, unless changed before lvmkit came
_log = logging.getLogger("lvmkit")
_said: set[tuple[int, str]] = set()
_enclosing: list[ThreadChoice] = []  # choices of the using() blocks we are inside
_said_resumed: set[tuple[str, int]] = set()  # resumes told once that their bits may differ


@dataclass(frozen=True)
class ThreadChoice:
    """What :func:`choose` decided: torch's intra-op thread count and why."""

    threads: int  # what torch's operators use
    usable: int  # CPUs this process may use (affinity mask, cgroup quota)
    busy: int  # of those, kept busy by other processes when the choice was made
    reason: str  # "auto", "asked", or what the user set ("OMP_NUM_THREADS=2", …)

    def describe(self) -> str:
        if self.reason == "auto":
            others = f", {self.busy} busy with other work" if self.busy else ""
            return f"{self.threads} CPU thread(s) ({self.usable} usable{others})"
        return f"{self.threads} CPU thread(s) ({self.reason})"


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        count = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(count, math.ceil(quota))) if quota is not None else max(1, count)


def _cgroup_quota() -> float | None:
    """CPUs the cgroup allows (cgroup v2 ``cpu.max``, v1 ``cfs_quota_us``), or None."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


_BUSY_FRESH = 10.0  # seconds a measurement of the busy CPUs is reused (calls come in runs)
_busy: list[tuple[float, int]] = []  # the last (time, busy CPUs)


def busy_cpus(samples: int = 6, interval: float = 0.015) -> int:
    """How many CPUs other processes keep busy now: the median over a few samples of the
    runnable tasks (``procs_running`` of ``/proc/stat``) less this process's own; 0 where the
    kernel does not say. A measurement is reused for ten seconds."""
    now = time.monotonic()
    if _busy and now - _busy[-1][0] < _BUSY_FRESH:
        return _busy[-1][1]
    counts = []
    for i in range(samples):
        running, own = _procs_running(), _own_running()
        if running is None:
            return 0
        counts.append(max(0, running - own))
        if i + 1 < samples:
            time.sleep(interval)
    busy = int(statistics.median(counts))
    _busy[:] = [(time.monotonic(), busy)]
    return busy


def _procs_running() -> int | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _own_running() -> int:
    """This process's threads that are running or runnable (at least this one)."""
    count = 0
    try:
        for task in Path("/proc/self/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            if stat[stat.rindex(")") + 2 :].startswith("R"):
                count += 1
    except OSError:
        return 1
    return max(1, count)


def choose(threads: int | str = AUTO) -> ThreadChoice:
    """The thread count for ``threads`` (``"auto"`` or an int); see the module docstring."""
    usable = usable_cpus()
    if not isinstance(threads, str):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be 'auto' or an int >= 1; got {threads!r}")
        return ThreadChoice(threads, usable, 0, "asked")
    if threads != AUTO:
        raise ValueError(f"threads must be 'auto' or an int >= 1; got {threads!r}")
    user = _set_by_user()
    if user is not None:
        return ThreadChoice(user[0], usable, 0, user[1])
    current = torch.get_num_threads()
    busy = busy_cpus()
    return ThreadChoice(max(1, min(current, usable - busy)), usable, busy, AUTO)


def _set_by_user() -> tuple[int, str] | None:
    """A thread count the user set (the environment, or torch.set_num_threads after lvmkit was
    imported), and how; None where they set none."""
    for name in _ENVIRONMENT:
        if os.environ.get(name):
            return torch.get_num_threads(), f"{name}={os.environ[name]}"
    current = torch.get_num_threads()
    if current != _AT_IMPORT:
        return current, "set with torch.set_num_threads"
    return None


def resumed(threads: int | str | None, recorded: int | None, what: str) -> int | str | None:
    """The threads of a resumed run or a continued evaluation: the count it started with
    (``recorded``) where ``threads`` is ``"auto"`` and nothing else was asked — torch's CPU
    kernels split their sums by thread, so the same seed *and* thread count give the same bits.
    Where something else was asked (an int, ``OMP_NUM_THREADS``, ``torch.set_num_threads``, a
    choice the CLI already made), that is kept and one log line says the bits may differ."""
    if recorded is None or threads is None:
        return threads
    if threads == AUTO:
        if _enclosing:
            asked: tuple[int, str] | None = (_enclosing[-1].threads, _enclosing[-1].reason)
        else:
            asked = _set_by_user()
        if asked is None:
            _log.warning(
                "lvmkit: %s continues with the %d CPU thread(s) it started with (the same seed "
                "and thread count give the same bits)", what, recorded,
            )  # fmt: skip
            return recorded
        count, reason = asked
    else:
        count, reason = int(threads), "asked"
    if count != recorded and (what, count) not in _said_resumed:
        _said_resumed.add((what, count))
        _log.warning(
            "lvmkit: %s started with %d CPU thread(s) and continues with %d (%s): its numbers "
            "may differ in the last bits from a run never interrupted (pass threads=%d for the "
            "same bits)", what, recorded, count, reason, recorded,
        )  # fmt: skip
    return threads


@contextmanager
def using(threads: int | str | None = AUTO) -> Iterator[ThreadChoice | None]:
    """torch's thread count for the block (``None``: left alone), given back afterwards."""
    if threads is None:
        yield None
        return
    if threads == AUTO and _enclosing:  # inside a choice already made (the CLI's): keep it
        yield _enclosing[-1]
        return
    choice = choose(threads)
    before = torch.get_num_threads()
    key = (choice.threads, choice.reason)
    if key not in _said:
        _said.add(key)
        _log.warning("lvmkit: %s", choice.describe())
    if choice.threads != before:
        torch.set_num_threads(choice.threads)
    _enclosing.append(choice)
    try:
        yield choice
    finally:
        _enclosing.pop()
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
