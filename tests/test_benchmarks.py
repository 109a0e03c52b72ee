"""Every benchmark suite runs at its quick size, and its table has the promised shape."""

from __future__ import annotations

import pandas as pd
import pytest

from lvmkit.benchmarks import BENCHMARKS, speed
from lvmkit.cli import main


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_runs_from_the_cli(name, tmp_path, capsys):
    assert (
        main(["bench", name, "--profile", "quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    )
    csv = tmp_path / f"{name}-cpu-quick.csv"
    markdown = tmp_path / f"{name}-cpu-quick.md"
    assert len(pd.read_csv(csv)) > 0 and markdown.read_text().startswith("|")
    assert "written:" in capsys.readouterr().out


def test_speed_table():
    frame = speed.run("quick", device="cpu")
    steps = frame[frame.task == "svi_step"]
    measured = steps[steps.median_ms.notna()]
    assert set(measured.contender) == {
        "pytorch",
        "pytorch_fused",
        "lvmkit",
        "lvmkit_mean_field",
        "lvmkit_compiled",
        "pyro_svi",
    }
    by_name = measured.set_index("contender")
    assert by_name.loc["pytorch", "ratio_to_pytorch"] == 1.0
    assert by_name.loc["pytorch_fused", "ratio_to_pytorch_fused"] == 1.0
    assert (measured.median_ms > 0).all() and (measured.iqr_ms >= 0).all()
    assert (measured.examples_per_s == measured.batch_size / (measured.median_ms / 1e3)).all()
    skipped = steps[steps.median_ms.isna()]
    assert list(skipped.contender) == ["numpyro_jit"] and skipped.note.str.len().gt(0).all()
    evaluation = frame[frame.task.str.startswith("evaluate")]
    assert len(evaluation) == 1 and evaluation.seconds_per_1000_points.iloc[0] > 0


def test_unknown_suite_and_profile(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "sped"])
    assert "Did you mean 'speed'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        speed.run("fast", device="cpu")
