"""Fault injection: killed runs, damaged checkpoints, divergence, unwritable or full workdirs.

Runs that are killed are real subprocesses killed with SIGKILL; a resumed run must end with
bit-identical params to the run that was never interrupted.
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from hoyertrim import checkpoint as checkpoint_lib
from hoyertrim.checkpoint import Checkpointer
from hoyertrim.train import TrainingDivergedError, fit
from helpers import small_mlp, synthetic

_RUN = """
import hashlib, os, signal, sys, warnings
warnings.filterwarnings("ignore")
import jax, numpy as np, optax
sys.path.insert(0, {tests!r})
from helpers import synthetic, small_mlp
from hoyertrim.checkpoint import Checkpointer
from hoyertrim.train import fit
directory, epochs, kill_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def on_epoch_end(epoch, metrics):
    print(f"epoch {{epoch}}", flush=True)
    if epoch == kill_after:  # the asynchronous save of this epoch is still being written
        os.kill(os.getpid(), signal.SIGKILL)

state, _ = fit(small_mlp(), optax.adam(1e-3), synthetic(), epochs=epochs, batch_size=32,
               progress=False, checkpointer=Checkpointer(directory), on_epoch_end=on_epoch_end)
data = b"".join(np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(state.params))
print("HASH", hashlib.sha256(data).hexdigest(), flush=True)
"""


def _start(directory, epochs, kill_after=0):
    script = _RUN.format(tests=os.path.dirname(__file__))
    return subprocess.Popen([sys.executable, "-c", script, str(directory), str(epochs),
                             str(kill_after)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _hash(process):
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    return [line.split()[1] for line in out.splitlines() if line.startswith("HASH")][0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _hash(_start(tmp_path_factory.mktemp("clean") / "run", 4))


@pytest.mark.slow
def test_killed_during_checkpoint_write_resumes_bit_identically(tmp_path, uninterrupted):
    killed = _start(tmp_path / "run", 4, kill_after=2)
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert _hash(_start(tmp_path / "run", 4)) == uninterrupted


@pytest.mark.slow
def test_killed_during_an_epoch_resumes_bit_identically(tmp_path, uninterrupted):
    process = _start(tmp_path / "run", 4)
    for line in process.stdout:  # wait until epoch 1 is saved, then kill inside epoch 2
        if line.startswith("epoch 1"):
            break
    time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert _hash(_start(tmp_path / "run", 4)) == uninterrupted


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["state", ""])  # the arrays only, or every file
def test_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, damaged):
    model, dataset = small_mlp(), synthetic(2000)
    reference, _ = fit(model, optax.adam(1e-3), dataset, epochs=3, batch_size=64,
                       progress=False)
    fit(model, optax.adam(1e-3), dataset, epochs=2, batch_size=64, progress=False,
        checkpointer=Checkpointer(tmp_path / "run"))
    for path in (tmp_path / "run" / "2" / damaged).rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[:7])  # truncated
    with pytest.warns(UserWarning, match="step 2.*unreadable"):
        resumed, history = fit(model, optax.adam(1e-3), dataset, epochs=3, batch_size=64,
                               progress=False, checkpointer=Checkpointer(tmp_path / "run"))
    assert [h["epoch"] for h in history] == [2, 3]
    assert (tmp_path / "run" / "2.unreadable").is_dir()
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(reference.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_no_readable_checkpoint_is_a_clear_error_or_a_fresh_start(tmp_path):
    model, dataset = small_mlp(), synthetic(1000)
    fit(model, optax.adam(1e-3), dataset, epochs=1, batch_size=64, progress=False,
        checkpointer=Checkpointer(tmp_path / "run"))
    for path in (tmp_path / "run" / "1" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    with pytest.raises(ValueError, match="can be read.*Delete the directory"):
        fit(model, optax.adam(1e-3), dataset, epochs=2, batch_size=64, progress=False,
            checkpointer=Checkpointer(tmp_path / "run"))
    # With its metadata gone too, the step is set aside with a warning and the run starts over.
    (tmp_path / "run" / "1" / "_CHECKPOINT_METADATA").write_text("")
    with pytest.warns(UserWarning, match="step 1 .*unreadable"):
        _, history = fit(model, optax.adam(1e-3), dataset, epochs=2, batch_size=64,
                         progress=False, checkpointer=Checkpointer(tmp_path / "run"))
    assert [h["epoch"] for h in history] == [1, 2]


@pytest.mark.slow  # seconds, not milliseconds: keeps the quick tier under 90 s
def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    model, dataset = small_mlp(), synthetic(1000)
    fit(model, optax.sgd(0.01), dataset, epochs=1, batch_size=50, progress=False,
        checkpointer=Checkpointer(tmp_path / "run"))
    with pytest.raises(TrainingDivergedError, match=r"at step (2\d|3\d|40) \(epoch 2\).*epoch 1"):
        fit(model, optax.sgd(1e30), dataset, epochs=3, batch_size=50, progress=False,
            checkpointer=Checkpointer(tmp_path / "run"))
    checkpointer = Checkpointer(tmp_path / "run")
    assert checkpointer.all_steps() == [1]
    template, _ = fit(model, optax.sgd(0.01), dataset, epochs=0, progress=False)
    restored, _ = checkpointer.restore(template)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(restored.params))


def test_unwritable_workdir_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="Cannot write checkpoints to .*a_file/run"):
        Checkpointer(blocker / "run")


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
    model, dataset = small_mlp(), synthetic(1000)
    checkpointer = Checkpointer(tmp_path / "run")
    monkeypatch.setattr(checkpoint_lib.shutil, "disk_usage",
                        lambda path: type("Usage", (), {"free": 1000})())
    epochs_run = []
    with pytest.raises(OSError, match="1,000 bytes free"):
        fit(model, optax.adam(1e-3), dataset, epochs=2, progress=False, checkpointer=checkpointer,
            on_epoch_end=lambda epoch, metrics: epochs_run.append(epoch))
    assert epochs_run == []
