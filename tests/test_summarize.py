"""summarize.py never replaces committed results with fewer rows."""

import pathlib
import shutil
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

import summarize  # noqa: E402


def test_summarize_on_empty_runs_changes_nothing(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    shutil.copy(REPO / "results" / "summary.md", out / "summary.md")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit, match="refusing to overwrite"):
        summarize.main(["--runs", str(tmp_path / "runs"), "--out", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
