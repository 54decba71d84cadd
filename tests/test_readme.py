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
    assert any(line.startswith("conv: relu program") for line in lines)
    assert any(line.startswith("out: linear program") for line in lines)
    assert "top1_agreement" in lines[-1]


def test_quick_start_is_the_quickstart_command():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert commands == ["pip install -e . && hoyertrim quickstart",
                        'pip install -e ".[test]" && python -m pytest']


@pytest.mark.slow
def test_quickstart_runs_the_whole_chain(data_root, tmp_path):
    """The console script, as installed, with a shorter training and fewer Net-Trim samples."""
    script = pathlib.Path(sys.executable).with_name("hoyertrim")
    result = subprocess.run([str(script), "quickstart", "--epochs", "1", "--samples", "1000",
                             "--workdir", str(tmp_path / "qs"), "--no-progress"],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path,
                            env={**os.environ, "HOYERTRIM_DATA": str(data_root)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("test accuracy") == 3  # dense, Net-Trim, compact
    report = (tmp_path / "qs" / "report" / "report.md").read_text()
    assert "Net-Trim cascade ε=0.1" in report and "(test)" in report
    assert sorted(p.name for p in (tmp_path / "qs").iterdir()) == [
        "compact-cascade-0.1", "dense", "nettrim-cascade-0.1", "report"]
