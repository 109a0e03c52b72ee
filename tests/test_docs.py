"""Docstring examples, every Python example in the README and in docs/ run as written; the
code excerpts in docs/ are the code (verbatim), and the tables there are the committed results."""

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
    "lvmkit.estimators",
    "lvmkit.pairs",
    "lvmkit.models.nonlinear",
    "lvmkit.guides.categorical",
    "lvmkit.guides.gaussian",
    "lvmkit.inference.train",
    "lvmkit.inference.evaluate",
    "lvmkit.inference.ais",
    "lvmkit.inference.gaps",
    "lvmkit.inference.latents",
    "lvmkit.inference.feeds",
    "lvmkit.inference.callbacks",
    "lvmkit.inference.objectives",
    "lvmkit.runs",
    "lvmkit.inference.posterior",
    "lvmkit.models.autoencoder",
    "lvmkit.models.cvae",
    "lvmkit.models.m2",
    "lvmkit.models.sequence",
    "lvmkit.guides.sequence",
    "lvmkit.music",
    "lvmkit.data",
    "lvmkit.datasets",
    "lvmkit.models.vqvae",
    "lvmkit.models.vampprior",
    "lvmkit.guides.flow",
    "lvmkit.guides.vq",
    "lvmkit.benchmarks",
]
DOCS = sorted((ROOT / "docs").glob("*.md"))
FAMILY_PAGES = [
    "gmm", "nonlinear", "vae", "autoencoders", "cvae", "m2", "variants", "sequence", "vqvae",
]  # fmt: skip


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


# data containers, configs and errors: documented, their examples are the builders' and fit's
WITHOUT_EXAMPLE = {
    "ActiveUnits", "AutoencoderConfig", "CVAEConfig", "CategoricalEncoderConfig",
    "CheckpointError", "Dataset", "EvaluationSummary", "FitInfo", "FitResult", "GMMConfig",
    "GaussianEncoderConfig", "M2Config", "NonFiniteLossError", "NonlinearConfig", "VAEConfig",
    "RecurrentVAEConfig", "DMMConfig", "VQVAEConfig",
    "Autoencoder", "ConditionalBaseline", "ConditionalEncoder", "DeterministicEncoder",
    "SemiSupervisedEncoder", "StackedSemiSupervisedEncoder",
}  # fmt: skip


def test_every_public_function_and_class_has_an_example():
    import lvmkit

    missing = [
        name
        for name in lvmkit.__all__
        if callable(getattr(lvmkit, name))
        and name not in WITHOUT_EXAMPLE
        and ">>>" not in (getattr(lvmkit, name).__doc__ or "")
    ]
    assert missing == []


def test_every_public_name_is_documented():
    import lvmkit

    undocumented = [
        name
        for name in lvmkit.__all__
        if name != "__version__"
        and callable(getattr(lvmkit, name))
        and not (getattr(lvmkit, name).__doc__ or "").strip()
    ]
    assert undocumented == []


def _docs_blocks() -> list[tuple[str, int, str]]:
    out = []
    for page in DOCS:
        blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
        out += [(page.name, i, block) for i, block in enumerate(blocks)]
    return out


def test_every_model_family_has_a_page_with_math_code_and_a_table():
    for name in FAMILY_PAGES:
        text = (ROOT / "docs" / f"{name}.md").read_text()
        assert "```python\n# from " in text or name == "variants", name
        assert "<!-- table: benchmarks/results/" in text, name


@pytest.mark.parametrize(("page", "index", "block"), _docs_blocks())
def test_docs_code_is_the_code_or_runs(page, index, block, tmp_path, monkeypatch):
    first, _, rest = block.partition("\n")
    if first.startswith("# from "):  # an excerpt: it must be in that file, verbatim
        source = (ROOT / first.removeprefix("# from ").strip()).read_text()
        assert rest in source, f"docs/{page} block {index} is not in {first[7:]} any more"
    else:
        monkeypatch.chdir(tmp_path)
        exec(compile(block, f"docs/{page} example {index}", "exec"), {})


@pytest.mark.parametrize("page", [p.name for p in DOCS])
def test_docs_tables_are_the_committed_results(page):
    text = (ROOT / "docs" / page).read_text()
    for path, table in re.findall(r"<!-- table: (\S+) -->\n(.*?)(?:\n\n|\Z)", text, flags=re.S):
        assert table.strip() == (ROOT / path).read_text().strip(), f"{page}: {path} changed"
