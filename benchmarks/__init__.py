"""Benchmark suites, each a function returning a pandas DataFrame.

``BENCHMARKS`` maps a suite's name to its ``run(profile, device=..., figures_dir=...)``; every
suite has a "quick" profile (run by the tests) and a "full" one, and draws its figures into
``figures_dir`` when given (the speed suite has none). The mixture and VAE suites are protocols
that take your own models as contenders (:mod:`lvmkit.benchmarks.contenders`): :func:`run`
runs one with them. :func:`write_results` stores a table as CSV and Markdown, and its learning
curves (``frame.attrs["curves"]``) as ``NAME-curves.csv``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from lvmkit.base import check_choice
from lvmkit.benchmarks import ais, gmm, nonlinear, sequence, speed, vae
from lvmkit.benchmarks.contenders import Contender, Task
from lvmkit.inference.checkpoint import atomic_write_text

BENCHMARKS: dict[str, Callable[..., pd.DataFrame]] = {
    "ais": ais.run,
    "gmm": gmm.run,
    "nonlinear": nonlinear.run,
    "sequence": sequence.run,
    "speed": speed.run,
    **{f"vae-{name}": run for name, run in vae.SUITES.items()},
}
TAKES_CONTENDERS = ("gmm", "sequence", *(f"vae-{name}" for name in vae.SUITES))


def run(
    suite: str,
    profile: str = "full",
    *,
    device: str = "cpu",
    contenders: Mapping[str, Callable[[Task], Any]] | None = None,
    only: str | None = None,
    settings: tuple[str, ...] | None = None,
    figures_dir: str | Path | None = None,
) -> pd.DataFrame:
    """Run a suite (``"vae-iwae"``, ``"vae iwae"``, ``"gmm"``, …) under its ``profile``, your
    ``contenders`` — ``{name: factory}``, ``factory(task)`` returning ``(model, guide)`` or a
    :class:`Contender` — beside the built-in rows and the papers'. ``only`` runs one contender
    (the published rows always come); ``settings`` a subset of the suite's settings (e.g.
    ``("100 labels",)``).

    Example::

        >>> import lvmkit.benchmarks as bench
        >>> sorted(bench.TAKES_CONTENDERS)[:3]
        ['gmm', 'sequence', 'vae-cvae']
    """
    key = suite.strip().replace(" ", "-").replace("/", "-")
    fn = BENCHMARKS[check_choice("suite", key, BENCHMARKS)]
    if key not in TAKES_CONTENDERS:
        if contenders or only or settings:
            raise ValueError(
                f"suite {key!r} runs fixed contenders; contenders, only and settings are for "
                f"{', '.join(TAKES_CONTENDERS)}"
            )
        return fn(profile, device=device, figures_dir=figures_dir)
    return fn(
        profile,
        device=device,
        figures_dir=figures_dir,
        contenders=contenders,
        only=only,
        settings=settings,
    )


def write_results(frame: pd.DataFrame, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``frame`` to ``out_dir/name.csv`` and ``out_dir/name.md`` (and the tables it carries
    in its attrs: learning curves to ``out_dir/name-curves.csv``, per-point numbers to
    ``out_dir/name-points.csv``); return the first two paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv, markdown = out / f"{name}.csv", out / f"{name}.md"
    atomic_write_text(csv, frame.to_csv(index=False))
    atomic_write_text(markdown, frame.to_markdown(index=False, floatfmt=".3g") + "\n")
    for key in ("curves", "points"):
        table = frame.attrs.get(key)
        if isinstance(table, pd.DataFrame) and not table.empty:
            atomic_write_text(out / f"{name}-{key}.csv", table.to_csv(index=False))
    return csv, markdown


__all__ = ["BENCHMARKS", "TAKES_CONTENDERS", "Contender", "Task", "run", "write_results"]
