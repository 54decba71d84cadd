"""README's "Prune your own model" example is the file the slow test runs, and it runs."""

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
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
    command = [str(script), "quickstart", "--epochs", "1", "--samples", "1000", "--workdir",
               str(tmp_path / "qs")]
    env = {**os.environ, "HOYERTRIM_DATA": str(data_root)}
    result = subprocess.run([*command, "--no-progress"], capture_output=True, text=True,
                            timeout=900, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("test accuracy") == 3  # dense, Net-Trim, compact
    report = (tmp_path / "qs" / "report" / "report.md").read_text()
    assert "Net-Trim cascade ε=0.1" in report and "(test)" in report
    assert sorted(p.name for p in (tmp_path / "qs").iterdir()) == [
        "compact-cascade-0.1", "dense", "nettrim-cascade-0.1", "report"]
    assert not result.stderr  # the libraries' warnings and logs are not shown
    # A copied work folder is reused where it is, stage by stage; other settings are refused
    # with a message about the quick start's own option.
    shutil.copytree(tmp_path / "qs", tmp_path / "copy")
    again = subprocess.run([*command[:-1], str(tmp_path / "copy"), "--no-progress"],
                           capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert again.returncode == 0 and again.stdout.count("\nreused ") == 3, again.stderr
    other = subprocess.run([*command[:-1], str(tmp_path / "copy"), "--epochs", "2",
                            "--no-progress"], capture_output=True, text=True, timeout=900,
                           cwd=tmp_path, env=env)
    assert other.returncode == 1 and len(other.stderr.strip().splitlines()) == 1
    assert "holds a quick start made with other settings" in other.stderr
    assert "--workdir" in other.stderr and "--out" not in other.stderr


@pytest.mark.slow
def test_the_library_in_a_few_lines_runs(data_root, monkeypatch):
    """README's library block, as written, with one epoch per fit and fewer Net-Trim images."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## The library in a few lines", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    shortened = code.replace("epochs=30", "epochs=1").replace("[:5000]", "[:600]")
    assert shortened.count("epochs=1") == 2 and "[:600]" in shortened
    monkeypatch.setenv("HOYERTRIM_DATA", str(data_root))
    namespace = {}
    exec(compile(shortened, "README.md", "exec"), namespace)
    pruned, small, ds = namespace["pruned"], namespace["small"], namespace["ds"]
    assert all(layer.measured <= layer.epsilon_certified * (1 + 1e-5) + 1e-6
               for layer in pruned.layers.values())
    dense = namespace["model"].apply({"params": pruned.params}, ds.test.images[:8])
    np.testing.assert_allclose(small.apply(ds.test.images[:8]), dense, rtol=1e-4, atol=1e-4)
