"""README's "Prune your own model" example is the file the slow test runs, and it runs."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "prune_your_own.py"


def test_readme_example_is_the_example_file():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Prune your own model", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert code == EXAMPLE.read_text()


@pytest.mark.slow
def test_readme_example_runs_as_written(data_root):
    result = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True,
                            env={**os.environ, "HOYERTRIM_DATA": str(data_root)}, timeout=900,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("Conv_0: relu program") for line in lines)
    assert any(line.startswith("Dense_1: linear program") for line in lines)
    assert "top1_agreement" in lines[-1]
