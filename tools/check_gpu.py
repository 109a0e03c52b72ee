"""`make check-gpu`: on a machine with CUDA, the whole test suite there and the speed benchmark.

1. the test suite (``pytest``, the tests marked slow left out as in ``make test``; spread over
   worker processes with pytest-xdist where it is installed), on a machine where CUDA is there:
   the CUDA tests run, and every other test must pass there too;
2. ``lvmkit bench speed --device cuda --profile full`` (steps, epochs, evaluation, the
   ``max_pairs`` sweep), written to ``--out`` as ``speed-cuda-full.csv/.md``, run alone so that
   nothing else shares the GPU or the CPU while it is timed;
3. a short summary, printed and written to ``check-gpu.md`` beside the benchmark's files.

On a machine without CUDA it says so and exits 0. It exits non-zero when a test failed or the
benchmark did not finish. Budget: about 8 minutes on one H200 with 16 cores.

    python tools/check_gpu.py [--out benchmarks/results] [--workers N] [--skip-bench]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--workers", type=int, default=None, help="pytest-xdist workers")
    parser.add_argument("--skip-bench", action="store_true", help="the tests only")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (e.g. a test file)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            f"check-gpu: no CUDA device here (torch {torch.__version__}), so nothing to check: "
            "run `make check-gpu` on a machine with a GPU"
        )
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0)
    lines = [
        f"# check-gpu on {gpu}",
        "",
        f"{datetime.date.today().isoformat()}, commit {_commit()}; torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), Python {platform.python_version()}, "
        f"{os.cpu_count()} CPU cores.",
        "",
    ]
    tests_ok, summary = _tests(out, args.workers, args.pytest_args)
    lines += summary
    bench_ok = True
    if not args.skip_bench:
        bench_ok, summary = _bench(out)
        lines += ["", *summary]
    text = "\n".join(lines) + "\n"
    (out / "check-gpu.md").write_text(text)
    print(text)
    return 0 if tests_ok and bench_ok else 1


def _tests(out: Path, workers: int | None, extra: list[str]) -> tuple[bool, list[str]]:
    report = out / "check-gpu-tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:benchmark"]
    command += ["--junitxml", str(report), "-o", "junit_family=xunit1"]
    if importlib.util.find_spec("xdist") is not None:
        n = workers or max(1, min(8, (os.cpu_count() or 2) // 2))
        command += ["-n", str(n)]
    command += extra
    print("check-gpu:", " ".join(command), flush=True)
    tic = time.perf_counter()
    code = subprocess.call(command, cwd=ROOT, env={**os.environ, "MPLBACKEND": "Agg"})
    seconds = time.perf_counter() - tic
    counts = _counts(report)
    failed = [f"- `{name}`" for name in counts.pop("failed_names")]
    said = ", ".join(f"{v} {k}" for k, v in counts.items())
    lines = [f"## Tests: {said} in {seconds:.0f} s (pytest exit {code})", "", *failed]
    return code == 0, lines


def _counts(report: Path) -> dict:
    if not report.exists():
        return {"failed_names": [], "reports": 0}
    root = ET.parse(report).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failures, errors = int(suite.get("failures", 0)), int(suite.get("errors", 0))
    names = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        "failed_names": names,
        "passed": total - skipped - failures - errors,
        "failed": failures,
        "errors": errors,
        "skipped": skipped,
    }


def _bench(out: Path) -> tuple[bool, list[str]]:
    command = [sys.executable, "-m", "lvmkit", "bench", "speed", "--device", "cuda"]
    command += ["--profile", "full", "--out", str(out)]
    print("check-gpu:", " ".join(command), flush=True)
    tic = time.perf_counter()
    code = subprocess.call(command, cwd=ROOT, env={**os.environ, "MPLBACKEND": "Agg"})
    seconds = time.perf_counter() - tic
    lines = [f"## `lvmkit bench speed --device cuda --profile full`: {seconds:.0f} s (exit {code})"]
    table = out / "speed-cuda-full.csv"
    if code == 0 and table.exists():
        import pandas as pd

        frame = pd.read_csv(table)
        keep = frame[frame.task.isin(["svi_step", "epoch", "evaluate K=5000"])]
        columns = ["task", "batch_size", "contender", "median_ms", "epoch_s", "seconds"]
        columns += ["ratio_to_pytorch_fused", "note"]
        lines += ["", keep[[c for c in columns if c in keep]].to_markdown(index=False)]
    return code == 0, lines


def _commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("LVMKIT_COMMIT", "unknown")


if __name__ == "__main__":
    sys.exit(main())
