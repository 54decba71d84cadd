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
from examples import user_models as um
from hoyertrim.data import Dataset, Split
from hoyertrim.train import data_mesh, fit
rng = np.random.default_rng(0)

def split(n):
    x = rng.random((n, 8, 8, 1), dtype=np.float32)
    return Split(x, (x.reshape(n, -1)[:, :32].sum(1) > 16).astype(np.int32))

data = Dataset("synthetic", split(1024), split(128), split(128), 2)
model = um.ConvBatchNormCNN(widths=(8, 16), hidden=32)  # BatchNorm and dropout
assert len(jax.devices()) == 4 and data_mesh(64).shape == {{"data": 4}}
assert data_mesh(66) is None and data_mesh(64, jax.devices()[:1]) is None
one, _ = fit(model, optax.adam(1e-3), data, epochs=2, batch_size=64, progress=False,
             devices=jax.devices()[:1])
many, history = fit(model, optax.adam(1e-3), data, epochs=2, batch_size=64, progress=False)
assert all(len(a.sharding.device_set) == 4 for a in jax.tree.leaves(many.params))
difference = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)))
print("DIFFERENCE", difference, history[-1]["val_accuracy"])
"""


@pytest.mark.slow
def test_a_data_parallel_epoch_equals_one_devices():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _SCRIPT.format(repo=repo)],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("DIFFERENCE")][0]
    # Params and optimizer state after two epochs (32 steps) differ only by the order of the
    # batch reductions: float32 rounding, well below 1e-5.
    assert float(line.split()[1]) < 1e-5
