"""Ctrl-C and SIGTERM at random points of `train`, `nettrim` and `finetune` (real processes on
the stand-in data): each try leaves a finished stage, a resumable one or nothing — never a
folder that blocks the next run, never a crash — and the run that finally finishes equals an
uninterrupted one."""

import json
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import hoyertrim
from hoyertrim import cli, pipeline

pytestmark = pytest.mark.slow
TRIES = 10
MESSAGES = ("nothing was written.", "nothing was kept; run the same command again to start "
            "over.", "run the same command again to resume.")


@pytest.fixture(scope="module")
def stages(tmp_path_factory, tiny_data_root):
    work = tmp_path_factory.mktemp("interrupted")
    data = ["--data-dir", str(tiny_data_root), "--no-progress"]
    assert cli.main(["train", "--model", "lenet300100", "--epochs", "2", "--out",
                     str(work / "dense"), *data]) == 0
    assert cli.main(["prune", str(work / "dense"), "--rule", "magnitude", "--value", "0.5",
                     "--out", str(work / "pruned"), *data]) == 0
    return work


def _command(tiny_data_root, *argv):
    # The console script with the stand-in data exempt from the md5 check, as in this process
    # (Ctrl-C during this wrapper's own imports ends it as it would end the script's two lines).
    return [sys.executable, "-c", "import signal, sys; "
            "signal.signal(signal.SIGINT, signal.SIG_DFL); from hoyertrim import cli, data; "
            "data._verify = lambda *a: None; "
            "signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(cli.main())",
            *argv, "--data-dir", str(tiny_data_root), "--no-progress"]


def _finished(command, out) -> tuple[float, float]:
    """Runs the command to its end; returns its seconds in all and until its stage opened."""
    started = time.perf_counter()
    process = subprocess.Popen([*command, "--out", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    while not (out / pipeline.MANIFEST).is_file() and process.poll() is None:
        time.sleep(0.02)
    opened = time.perf_counter() - started
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0 and not err, err  # the dependencies' noise hidden
    return time.perf_counter() - started, opened


def _state(out) -> str:
    """What a try left: nothing, a finished stage or a resumable one — anything else fails."""
    if not out.exists():
        return "nothing"
    manifest = json.loads((out / pipeline.MANIFEST).read_text())
    assert not (out / pipeline.LOCK).exists()
    if manifest["status"] == "complete":
        return "complete"
    assert manifest["status"] == "interrupted", manifest["status"]
    assert any(out.glob("checkpoints/[0-9]*")) or any(out.glob("layers/*.npz"))
    return "resumable"


def _interrupt_at_random_points(command, folder, seconds, opened, seed) -> list[str]:
    """Interrupts the command at random points (alternately Ctrl-C and SIGTERM; every other
    try at a time drawn over the whole run, the others within its stage's work once it has kept
    something — a checkpoint, a solved layer), each time where the last try left off, into a
    new folder once one is finished; then finishes the last one. Returns each try's exit status
    and what it left."""
    rng = random.Random(seed)
    seen, out = [], folder / "0"
    for attempt in range(TRIES):
        how = (signal.SIGINT, signal.SIGTERM)[attempt % 2]
        process = subprocess.Popen([*command, "--out", str(out)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        if attempt % 2:  # within the stage's work, once it has something to resume from
            while process.poll() is None and not (any(out.glob("checkpoints/[0-9]*"))
                                                  or any(out.glob("layers/*.npz"))):
                time.sleep(0.02)
            time.sleep(rng.uniform(0, (seconds - opened) / 2))
        else:
            time.sleep(rng.uniform(0.3, seconds))
        process.send_signal(how)
        _, err = process.communicate(timeout=300)
        # Before the command starts (the interpreter's start-up) or after it has ended, the
        # signal ends the process as it ends any: silently. In between: one line, no traceback.
        assert process.returncode in (0, -how, 128 + how), (process.returncode, err)
        if process.returncode < 0:
            assert not err
        elif process.returncode:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].endswith(MESSAGES), err
        seen.append((process.returncode, _state(out)))
        if seen[-1][1] == "complete":
            out = folder / str(attempt + 1)
    if seen[-1][1] != "complete":  # the next run finishes whatever was left
        _finished(command, out)
        assert _state(out) == "complete"
    return seen


def _same_params(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(hoyertrim.load(a).params),
                                                     jax.tree.leaves(hoyertrim.load(b).params)))


@pytest.mark.parametrize("name, argv", [
    ("train", ["train", "--model", "lenet300100", "--epochs", "6"]),
    ("nettrim", ["nettrim", "{work}/dense", "--epsilon", "0.1", "--samples", "300",
                 "--heldout", "100", "--scheme", "cascade"]),
    ("finetune", ["finetune", "{work}/pruned", "--epochs", "6"]),
])
def test_random_interruptions_leave_a_finished_or_resumable_stage(stages, tiny_data_root,
                                                                  name, argv):
    argv = [a.format(work=stages) for a in argv]
    reference = stages / f"{name}-reference"
    command = _command(tiny_data_root, *argv)
    _finished(command, reference)
    # How long a run takes once its programs are in the compilation cache, as the tries' are.
    seconds, opened = _finished(command, stages / f"{name}-again")
    folder = stages / f"{name}-interrupted"
    seen = _interrupt_at_random_points(command, folder, seconds, opened, seed=len(name))
    # Most tries stopped a running command (not one that had finished), several mid-stage.
    assert sum(code != 0 for code, _ in seen) >= TRIES // 2, seen
    assert sum(state == "resumable" for _, state in seen) >= 2, seen
    # Resumed however often, every stage equals the uninterrupted one.
    for out in folder.iterdir():
        assert _same_params(out, reference), (out, seen)
