"""Benchmark suites, each a function returning a pandas DataFrame.

``BENCHMARKS`` maps a suite's name to its ``run(profile, device=..., figures_dir=...)``; every
suite has a "quick" profile (run by the tests) and a "full" one, and draws its figures into
``figures_dir`` when given (the speed suite has none). :func:`write_results` stores a table as
CSV and Markdown.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from lvmkit.benchmarks import gmm, nonlinear, speed, vae
from lvmkit.inference.checkpoint import atomic_write_text

BENCHMARKS: dict[str, Callable[..., pd.DataFrame]] = {
    "gmm": gmm.run,
    "nonlinear": nonlinear.run,
    "speed": speed.run,
    **{f"vae-{name}": run for name, run in vae.SUITES.items()},
}


def write_results(frame: pd.DataFrame, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``frame`` to ``out_dir/name.csv`` and ``out_dir/name.md``; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv, markdown = out / f"{name}.csv", out / f"{name}.md"
    atomic_write_text(csv, frame.to_csv(index=False))
    atomic_write_text(markdown, frame.to_markdown(index=False, floatfmt=".3g") + "\n")
    return csv, markdown


__all__ = ["BENCHMARKS", "write_results"]
