"""Every benchmark suite runs at its quick size, and its table has the promised shape."""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

from lvmkit.benchmarks import BENCHMARKS, TAKES_CONTENDERS, speed
from lvmkit.cli import main

USER_PAIR = f"mine={Path(__file__).parent / 'user_models.py'}:make_pair"  # a path to a .py file


@pytest.mark.parametrize("name", sorted(set(BENCHMARKS) - {"speed"}))  # speed: test_speed_table
def test_every_benchmark_runs_from_the_cli(name, tmp_path, capsys):
    """Each suite at its quick size; those that take contenders with a user's own pair (given
    as a path to a .py file), whose row sits in the same table as the built-in and paper rows."""
    args = ["bench", name, "--profile", "quick", "--device", "cpu", "--out", str(tmp_path)]
    if name in TAKES_CONTENDERS:
        args += ["--contender", USER_PAIR]
    assert main(args) == 0
    # its progress lines went to this call's stderr, and the handler went with the call (a
    # handler kept on a stream pytest has since closed broke the next suite's logging)
    assert logging.getLogger("lvmkit.benchmarks").handlers == []
    csv = tmp_path / f"{name}-cpu-quick.csv"
    markdown = tmp_path / f"{name}-cpu-quick.md"
    table = pd.read_csv(csv)
    assert len(table) > 0 and markdown.read_text().startswith("|")
    assert "written:" in capsys.readouterr().out
    if name in TAKES_CONTENDERS:
        who = table[
            "method" if name == "gmm" else "variant" if name == "vae-variants" else "contender"
        ]
        assert "mine" in set(who) and len(set(who)) > 2, set(who)
        assert (tmp_path / f"{name}-cpu-quick-curves.csv").is_file()
    if name == "ais":  # the per-image numbers: which images move from IS to AIS
        points = pd.read_csv(tmp_path / "ais-cpu-quick-points.csv")
        assert {"image", "is", "ais_10", "approximation_gap"} <= set(points.columns)


HAS_NUMPYRO = (
    importlib.util.find_spec("numpyro") is not None and importlib.util.find_spec("jax") is not None
)
TORCH_CONTENDERS = {
    "pytorch_iwae",
    "lvmkit_iwae",
    "pytorch",
    "pytorch_fused",
    "lvmkit",
    "lvmkit_user_pair",
    "lvmkit_mean_field",
    "lvmkit_eager",
    "pyro_svi",
}


def test_speed_table(tmp_path, capsys):
    """The speed suite from the command line, at its quick size, and its table."""
    args = ["bench", "speed", "--profile", "quick", "--device", "cpu", "--out", str(tmp_path)]
    assert main(args) == 0 and "written:" in capsys.readouterr().out
    assert (tmp_path / "speed-cpu-quick.md").read_text().startswith("|")
    frame = pd.read_csv(tmp_path / "speed-cpu-quick.csv")
    steps = frame[frame.task == "svi_step"]
    measured = steps[steps.median_ms.notna()]
    expected = TORCH_CONTENDERS | ({"numpyro_jit"} if HAS_NUMPYRO else set())
    assert set(measured.contender) == expected
    by_name = measured.set_index("contender")
    assert by_name.loc["pytorch", "ratio_to_pytorch"] == 1.0
    assert by_name.loc["pytorch_fused", "ratio_to_pytorch_fused"] == 1.0
    assert (measured.median_ms > 0).all() and (measured.iqr_ms >= 0).all()
    assert (measured.examples_per_s == measured.batch_size / (measured.median_ms / 1e3)).all()
    if HAS_NUMPYRO:
        assert by_name.loc["numpyro_jit", "ratio_to_numpyro"] == 1.0
        assert by_name.ratio_to_numpyro.notna().all()
    else:  # reported, with the way to get it
        skipped = steps[steps.median_ms.isna()]
        assert list(skipped.contender) == ["numpyro_jit"]
        assert "pip install 'lvmkit[numpyro]'" in skipped.note.iloc[0]
    evaluation = frame[frame.task.str.startswith("evaluate K=")]
    assert list(evaluation.contender) == ["lvmkit", "lvmkit_eager"]
    assert (evaluation.seconds_per_1000_points > 0).all()
    assert list(evaluation.note.str.contains("eager")) == [True, True]  # 20 points: too few
    epochs = frame[frame.task == "epoch"].set_index("contender")
    epochs = epochs[epochs.epoch_s.notna()]
    pairs = ["lvmkit", "lvmkit_user_pair"]  # the built-in VAE, the same networks as functions
    others = ["pytorch_fused", *(["numpyro_jit"] if HAS_NUMPYRO else [])]
    assert set(epochs.index) == {*pairs, *(f"{o} ({p})" for o in others for p in pairs)}
    assert epochs.loc["pytorch_fused (lvmkit)", "ratio_to_pytorch_fused"] == 1.0
    if HAS_NUMPYRO:  # NumPyro's epochs: the same images in the same order, alternating
        assert epochs.loc["numpyro_jit (lvmkit)", "ratio_to_numpyro"] == 1.0
        assert (epochs.loc[pairs, "ratio_with_setup_to_numpyro"] > 0).all()
    assert (epochs.epoch_s > 0).all() and epochs.note.str.startswith("median of 2 epochs").all()
    assert (epochs.examples_per_s == speed.PROFILES["quick"].epoch_points / epochs.epoch_s).all()
    assert (epochs.loc[pairs, ["setup_s", "first_epoch_s", "ratio_with_setup"]] > 0).all().all()
    assert (epochs.loc[pairs, "compile_s"] == 0).all()  # 2 × 8 steps: too short to compile
    overhead = frame[frame.task == "overhead step"].set_index("contender")
    overhead = overhead[overhead.median_us.notna()]
    assert set(overhead.index) == {
        "pytorch", "pytorch_fused", "lvmkit", "lvmkit_eager", "lvmkit_user_pair",
        "lvmkit_user_pair_eager", "pyro_svi", *(["numpyro_jit"] if HAS_NUMPYRO else []),
    }  # fmt: skip
    assert (overhead.median_us > 0).all() and overhead.note.str.startswith(
        "16-8-2 VAE, one CPU thread"
    ).all()
    fits = frame[frame.task == "overhead fit"].set_index("contender")
    # the quick profile's 2 × 110 steps are fewer than fit compiles by default
    assert fits.loc["lvmkit_user_pair", "note"].endswith("eager")
    assert fits.loc[pairs, "ratio_with_setup"].notna().all()
    sweep = frame[frame.task == "evaluate max_pairs"]
    assert list(sweep.max_pairs) == list(speed.PROFILES["quick"].max_pairs_grid)
    assert (sweep.seconds_per_1000_points > 0).all()


def test_speed_without_numpyro_reports_a_skipped_row(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_numpyro(name, globals=None, locals=None, fromlist=(), level=0):
        if name.startswith(("numpyro", "jax")) or "_numpyro_vae" in (fromlist or ()):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_numpyro)
    monkeypatch.delitem(sys.modules, "lvmkit.benchmarks._numpyro_vae", raising=False)
    frame = speed.run("quick", device="cpu")
    row = frame[frame.contender == "numpyro_jit"].iloc[0]
    assert math.isnan(row.median_ms) and "pip install 'lvmkit[numpyro]'" in row.note
    assert frame[frame.task == "svi_step"].ratio_to_numpyro.isna().all()


def test_unknown_suite_and_profile(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "sped"])
    assert "Did you mean 'speed'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        speed.run("fast", device="cpu")


def test_gmm_table_sets_svi_beside_em(tmp_path):
    from lvmkit.benchmarks import gmm

    frame = gmm.run("quick", figures_dir=tmp_path)
    assert list(frame.method) == [gmm.EM, gmm.ENUMERATED, gmm.AMORTIZED]
    assert set(frame.attrs["curves"].contender) == {gmm.AMORTIZED}
    enumerated = frame.set_index("method").loc[gmm.ENUMERATED]
    assert enumerated.minus_em > -0.05 and enumerated.ari > 0.95
    assert enumerated.heldout_elbo == enumerated.heldout_log_lik  # y summed out: no gap
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gmm-blobs2d.png",
        "gmm-curves.png",
        "gmm-log-likelihood.png",
    ]


def test_nonlinear_table_sets_is_beside_quadrature(tmp_path):
    from lvmkit.benchmarks import nonlinear

    row = nonlinear.run("quick", figures_dir=tmp_path).iloc[0]
    assert abs(row.is_minus_exact) < 0.05 and row.elbo_minus_exact < 0
    assert (tmp_path / "nonlinear-spiral.png").is_file()
