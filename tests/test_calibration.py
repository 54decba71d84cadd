"""Streamed calibration signals: what Net-Trim reads of the calibration set, batch by batch."""

import tracemalloc

import flax.linen as nn
import jax
import numpy as np
import pytest

from hoyertrim import nettrim
from hoyertrim.inspection import Recorder, inspect_model
from hoyertrim import peers
from hoyertrim.nettrim import calibration
from hoyertrim.nettrim.gram import from_arrays


class _ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="VALID", name="conv0")(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(3, name="dense0")(x)


def _conv_setup():
    model = _ConvNet()
    images = np.random.default_rng(0).normal(size=(23, 6, 6, 1)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
    found = inspect_model(model, {"params": params}, images[:2])
    return found, images


@pytest.mark.parametrize("batch_size", [1, 5, 23])
def test_gathered_signals_do_not_depend_on_the_batching(batch_size):
    found, images = _conv_setup()
    maps = found.by_name()
    key = jax.random.PRNGKey(3)
    plans = {"conv0": calibration.row_plan(maps["conv0"], len(images), gram=False, max_rows=100,
                                           key=key, index=0),
             "dense0": calibration.GRAM}
    whole = Recorder(found.computation, found.maps, 1000)(found.computation.params, images,
                                                          list(maps))[1]
    got = calibration.gather(Recorder(found.computation, found.maps, batch_size), maps, plans,
                             images, found.computation.params)
    # conv0: the planned 100 of its 23 · 16 patch rows, as taken from all rows at once (up to
    # float32 rounding: XLA's kernels differ with the batch shape).
    rows = plans["conv0"]
    assert len(rows) == 100 and got["conv0"].rows == 23 * 16
    np.testing.assert_array_equal(got["conv0"].inputs,
                                  maps["conv0"].input_rows(whole["conv0"][0], rows))
    np.testing.assert_allclose(got["conv0"].outputs, whole["conv0"][1][rows], rtol=1e-5,
                               atol=1e-6)
    # dense0: the Gram sums of all 23 rows, and no rows.
    expected = from_arrays(*whole["dense0"])
    assert got["dense0"].inputs is None and got["dense0"].gram.rows == 23
    np.testing.assert_allclose(got["dense0"].gram.gram, expected.gram, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["dense0"].gram.cross, expected.cross, rtol=1e-5, atol=1e-5)


def test_relative_discrepancy_is_the_one_computed_from_all_rows():
    found, images = _conv_setup()
    maps = found.by_name()
    params = found.computation.params
    changed = jax.tree.map(lambda a: a * 1.1 if a.ndim == 4 else a, params)
    record = Recorder(found.computation, found.maps, 4)
    plans = dict.fromkeys(maps, calibration.ALL)
    got = calibration.relative_discrepancy(record, maps, plans, images, params, changed,
                                           lambda name, z: z)
    old = record(params, images, list(maps))[1]
    new = record(changed, images, list(maps))[1]
    for name in maps:
        want = np.linalg.norm(new[name][1] - old[name][1]) / np.linalg.norm(old[name][1])
        assert got[name] == pytest.approx(want, rel=1e-6)
    assert got["conv0"] == pytest.approx(0.1, rel=1e-5)  # conv0 scaled by 1.1 exactly
    assert got["dense0"] > 0


@pytest.mark.parametrize("layer", [peers.sparsegpt_layer, peers.wanda_layer,
                                   peers.magnitude_layer])
def test_peers_on_gram_sums_equal_peers_on_rows(layer):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    kernel = rng.normal(size=(16, 6))
    y = (x @ kernel + 0.3).astype(np.float32)
    common = dict(trained_kernel=kernel, trained_bias=np.full(6, 0.3), kept_fraction=0.5,
                  relu=False)
    rows = layer(x, y, **common)
    summed = layer(gram=from_arrays(x, y), **common)
    np.testing.assert_allclose(summed.kernel, rows.kernel, rtol=1e-5, atol=1e-6)
    assert summed.discrepancy == pytest.approx(rows.discrepancy, rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match="ReLU program"):
        layer(gram=from_arrays(x, y), **{**common, "relu": True})


def _linear_model(params, x):
    return x @ params["w"] + params["b"]


def _pruned_with_peak(images, params):
    tracemalloc.start()
    network = nettrim.prune_network(_linear_model, params, images, kept_fraction=0.5,
                                    heldout=0.0, max_rows=1000, batch_size=1000,
                                    progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return network, peak


def test_a_linear_program_is_solved_on_every_row_in_streamed_gram_sums():
    """P = 200,000 rows through `prune_network` in batches of 1,000: the layer is solved on all
    of them (not a `max_rows` subset), the certificate is measured over all of them, and the
    memory the run allocates does not grow with P."""
    rng = np.random.default_rng(5)
    params = {"w": rng.normal(size=(8, 4)).astype(np.float32),
              "b": rng.normal(size=4).astype(np.float32)}
    images = rng.normal(size=(200_000, 8)).astype(np.float32)
    _pruned_with_peak(images[:2_000], params)  # compiles what both runs below use
    _, small_peak = _pruned_with_peak(images[:20_000], params)
    network, peak = _pruned_with_peak(images, params)
    report = network.layers["w"]
    assert report.samples == 200_000 and report.program == "linear"
    # Holding the layer's rows (inputs and outputs, float32) would take 9.6 MB.
    assert peak < 200_000 * (8 + 4) * 4 / 4 and peak < 1.5 * small_peak + 2 ** 20
    # Recomputed here from all rows: the certificate holds on every one of them.
    z = _linear_model(params, images)
    new = _linear_model(jax.tree.map(np.asarray, network.params), images)
    measured = np.linalg.norm(new - z) / np.linalg.norm(z)
    assert measured <= report.epsilon_certified * (1 + 1e-5)
    assert report.measured == pytest.approx(measured, rel=1e-4)
