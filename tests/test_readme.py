"""The README's Python code runs verbatim and does what the README says it does."""

import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_python_runs_and_splices_the_sae(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert blocks, "the README has no Python block"
    monkeypatch.chdir(tmp_path)  # the README writes my_sae/ into the working folder
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert (tmp_path / "my_sae" / "cfg.json").is_file()
    positive, negative = map(int, re.search(r"(\d+) positive, (\d+) negative", out).groups())
    assert positive > 0 and negative > 0  # signed latents
    kept = re.search(r"loss ([\d.]+) -> ([\d.]+) spliced with the error term", out).groups()
    assert kept[0] == kept[1]  # the error term keeps the model's output
    assert "SAE latents cached: (1, 13, 2304)" in out
    clean, spliced = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+) on the recon", out).groups())
    assert spliced != pytest.approx(clean, abs=1e-3)  # the reconstruction alone changes it
