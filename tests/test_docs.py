"""Docstring examples and every Python example in the README run as written."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCTEST_MODULES = [
    "lvmkit.models.vae",
    "lvmkit.models.gmm",
    "lvmkit.models.nonlinear",
    "lvmkit.guides.categorical",
    "lvmkit.guides.gaussian",
    "lvmkit.inference.train",
    "lvmkit.inference.evaluate",
    "lvmkit.data",
]


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0


def _readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_examples():
    assert _readme_blocks()


@pytest.mark.parametrize("index", range(len(_readme_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_blocks()[index], f"README.md example {index}", "exec"), {})
