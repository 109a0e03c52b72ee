"""The kill-and-resume harness at a small size (tests/kill_resume.py has the larger setting)."""

from __future__ import annotations

from kill_resume import Setting, run_harness


def test_twenty_kills_lose_nothing(tmp_path, capsys):
    report = run_harness(tmp_path, kills=20, setting=Setting(), rng_seed=0)
    assert report.kills >= 20 and report.kills_while_writing >= 5
    assert report.resumes >= 10 and report.epochs_verified == Setting.epochs
    with capsys.disabled():
        print(f"\n{report.line()}")
