"""Beyond one device: data-parallel training on forced CPU devices equals one device's."""

import os
import subprocess
import sys

import pytest

_SCRIPT = """
import os, sys, warnings
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
warnings.filterwarnings("ignore")
import jax, numpy as np, optax
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from test_distributed import synthetic_data, small_cnn
from hoyertrim.train import data_mesh, fit
data, model = synthetic_data(), small_cnn()  # BatchNorm and dropout
assert len(jax.devices()) == 4 and data_mesh(64).shape == {{"data": 4}}
assert data_mesh(66) is None and data_mesh(64, jax.devices()[:1]) is None
one, _ = fit(model, optax.adam(1e-3), data, epochs=2, batch_size=64, progress=False,
             devices=jax.devices()[:1])
many, history = fit(model, optax.adam(1e-3), data, epochs=2, batch_size=64, progress=False)
assert all(len(a.sharding.device_set) == 4 for a in jax.tree.leaves(many.params))
difference = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)))
# The same run with the largest params and optimizer leaves split over the devices (FSDP-style):
# they stay split after every step, and the results are the replicated run's.
import hoyertrim.train
hoyertrim.train.SHARD_MIN_ELEMENTS = 1000  # this small CNN's two largest kernels
sharded, _ = fit(model, optax.adam(1e-3), data, epochs=2, batch_size=64, progress=False,
                 shard_params=True)
split = [a for a in jax.tree.leaves(sharded.params) + jax.tree.leaves(sharded.opt_state)
         if not a.sharding.is_fully_replicated]
assert len(split) == 6, [a.shape for a in split]  # two kernels and their two Adam moments
for a in split:
    assert a.addressable_shards[0].data.size * 4 == a.size
difference = max(difference, max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                 for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(sharded))))
print("DIFFERENCE", difference, history[-1]["val_accuracy"])
"""


@pytest.mark.slow
def test_a_data_parallel_epoch_equals_one_devices():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _SCRIPT.format(
        repo=repo, tests=os.path.join(repo, "tests"))],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("DIFFERENCE")][0]
    # Params and optimizer state after two epochs (32 steps) differ only by the order of the
    # batch reductions: float32 rounding, well below 1e-5.
    assert float(line.split()[1]) < 1e-5


_PROCESS = """
import os, sys, warnings
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
warnings.filterwarnings("ignore")
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{{port}}", num_processes=2,
                           process_id=process_id)
import numpy as np, optax
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from test_distributed import synthetic_data, small_cnn
from hoyertrim.train import fit
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
state, _ = fit(small_cnn(), optax.adam(1e-3), synthetic_data(), epochs=2, batch_size=64,
               progress=False)
np.savez(out, *[np.asarray(leaf) for leaf in jax.tree.leaves(state.params)])
"""


def synthetic_data():
    from hoyertrim.data import Dataset, Split
    import numpy as np
    rng = np.random.default_rng(0)

    def split(n):
        x = rng.random((n, 8, 8, 1), dtype=np.float32)
        return Split(x, (x.reshape(n, -1)[:, :32].sum(1) > 16).astype(np.int32))

    return Dataset("synthetic", split(1024), split(128), split(128), 2)


def small_cnn():
    from examples import user_models as um
    return um.ConvBatchNormCNN(widths=(8, 16), hidden=32)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    """Two processes joined by jax.distributed (loopback coordinator, CPU collectives), two
    devices each: one data-parallel run over the four; every process ends with the params a
    single device computes."""
    import jax
    import numpy as np
    import optax
    from hoyertrim.train import fit
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = _PROCESS.format(repo=repo, tests=os.path.join(repo, "tests"))
    port = str(_free_port())
    processes = [subprocess.Popen([sys.executable, "-c", script, str(i), port,
                                   str(tmp_path / f"params{i}.npz")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "JAX_PLATFORMS": "cpu"})
                 for i in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    state, _ = fit(small_cnn(), optax.adam(1e-3), synthetic_data(), epochs=2, batch_size=64,
                   progress=False, devices=jax.local_devices()[:1])
    expected = [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]
    for i in range(2):
        with np.load(tmp_path / f"params{i}.npz") as saved:
            got = [saved[f"arr_{k}"] for k in range(len(saved.files))]
        assert len(got) == len(expected)
        assert max(float(np.max(np.abs(a - b))) for a, b in zip(got, expected)) < 1e-5


_SHARDED_CAPTURE = """
import os, sys, warnings
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
warnings.filterwarnings("ignore")
import jax, numpy as np
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from test_distributed import synthetic_data, small_cnn
from hoyertrim.inspection import Recorder, inspect_model
from hoyertrim import peers
from hoyertrim.nettrim import calibration, prune_network
data, model = synthetic_data(), small_cnn()
variables = model.init(jax.random.PRNGKey(0), data.train.images[:2], train=False)
images = data.train.images[:512]
found = inspect_model(model, variables, images[:2], apply_kwargs={{"train": False}})
maps = {{m.name: m for m in found.maps}}
plans = {{n: calibration.GRAM for n in maps}}
signals = {{}}
for label, devices in (("one", jax.devices()[:1]), ("four", jax.devices())):
    record = Recorder(found.computation, found.maps, 128, devices=devices)
    signals[label] = calibration.gather(record, maps, plans, images, found.computation.params)
# The batches really ran split over the four devices.
record = Recorder(found.computation, found.maps, 128)
x = jax.device_put(images[:128], record._split)
assert len(record._run(found.computation.params, x)[0].sharding.device_set) == 4
worst = 0.0
for name in maps:
    a, b = signals["one"][name].gram, signals["four"][name].gram
    assert a.rows == b.rows == len(images) * maps[name].rows_per_example
    for u, v in ((a.gram, b.gram), (a.cross, b.cross), (a.y_squares, b.y_squares)):
        worst = max(worst, float(np.max(np.abs(u - v)) / np.max(np.abs(u))))
# SparseGPT's Hessian is read off these sums; the whole one-shot prune runs with its batches
# split over the four devices.
pruned = prune_network(model, variables, images, kept_fraction=0.5, solver=peers.sparsegpt_layer,
                    apply_kwargs={{"train": False}}, heldout=0, progress=False)
assert 0.45 < pruned.report().kept_fraction < 0.55
print("WORST", worst, len(jax.devices()))
"""


@pytest.mark.slow
def test_sharded_capture_and_gram_sums_equal_one_devices():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _SHARDED_CAPTURE.format(
        repo=repo, tests=os.path.join(repo, "tests"))], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("WORST")][0]
    # Each row's forward pass is the same computation on one device or four: the sums agree
    # to float32 rounding of the rows.
    assert float(line.split()[1]) < 1e-6 and line.split()[2] == "4"
