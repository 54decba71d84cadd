"""Structured Net-Trim (hoyertrim.nettrim.units): whole input units, certified, then compacted."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from hoyertrim import compact as compact_lib
from hoyertrim import nettrim
from hoyertrim.models import MLP
from hoyertrim.nettrim import solve_layer_units


def _layer(relu, seed=0, n=40, m=10, p=1500):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(p, n)).astype(np.float32) * rng.uniform(0.2, 3, n).astype(np.float32)
    w = rng.normal(size=(n, m)) * np.where(np.arange(n) < n // 2, 1.0, 0.05)[:, None]
    z = x @ w + 0.1
    return x, (np.maximum(z, 0) if relu else z).astype(np.float32), w


def _discrepancy(x, y, kernel, bias, relu):
    out = x.astype(np.float64) @ kernel + bias
    out = np.maximum(out, 0) if relu else out
    return np.linalg.norm(out - y) / np.linalg.norm(y)


@pytest.mark.parametrize("relu", [False, True])
def test_fewest_units_within_epsilon_with_an_independently_recomputed_certificate(relu):
    x, y, _ = _layer(relu)
    solution = solve_layer_units(x, y, epsilon=0.3, relu=relu)
    rows = np.any(solution.kernel != 0, axis=1)
    measured = _discrepancy(x, y, solution.kernel, solution.bias, relu)
    assert measured <= 0.3 and solution.discrepancy == pytest.approx(measured, rel=1e-4)
    assert 0 < rows.sum() < 20  # fewer than the 20 strong units; the weak ones all go
    assert not rows[20:].any()
    # One unit fewer (any of them, re-fit) would not meet ε: each kept unit is needed.
    kept = np.flatnonzero(rows)
    for drop in kept[:3]:
        keep = np.setdiff1d(kept, [drop])
        design = np.concatenate([x[:, keep], np.ones((len(x), 1), np.float32)], axis=1)
        if not relu:
            fit = np.linalg.lstsq(design, y, rcond=None)[0]
            assert _discrepancy(design[:, :-1], y, fit[:-1], fit[-1], False) > 0.3 * 0.9


@pytest.mark.parametrize("relu", [False, True])
def test_unit_count_mode_keeps_exactly_that_many_and_beats_group_norm_pruning(relu):
    x, y, w = _layer(relu, seed=1)
    solution = solve_layer_units(x, y, kept_fraction=0.25, relu=relu)
    rows = np.any(solution.kernel != 0, axis=1)
    assert rows.sum() == 10
    assert solution.epsilon >= _discrepancy(x, y, solution.kernel, solution.bias, relu)
    # Group-norm pruning of the same count (the largest ‖w_i‖, no re-fit) is further off.
    largest = np.argsort(-np.linalg.norm(w, axis=1))[:10]
    kernel = np.zeros_like(w)
    kernel[largest] = w[largest]
    assert solution.discrepancy < _discrepancy(x, y, kernel, 0.1, relu)


def test_gram_sums_give_the_rows_solution():
    x, y, _ = _layer(False, seed=2)
    from hoyertrim.nettrim.gram import from_arrays
    rows = solve_layer_units(x, y, kept_fraction=0.3, relu=False, form="rows")
    summed = solve_layer_units(gram=from_arrays(x, y), kept_fraction=0.3, relu=False)
    np.testing.assert_array_equal(np.any(rows.kernel != 0, 1), np.any(summed.kernel != 0, 1))
    np.testing.assert_allclose(summed.kernel, rows.kernel, rtol=1e-3, atol=1e-4)


class _ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), padding="SAME", name="conv0")(x))
        x = nn.relu(nn.Conv(6, (3, 3), padding="SAME", name="conv1")(x))
        return nn.Dense(4, name="dense0")(x.mean(axis=(1, 2)))


@pytest.mark.slow  # seconds: keeps the quick tier under 90 s
def test_a_convolution_loses_whole_input_channels():
    model = _ConvNet()
    images = jax.random.uniform(jax.random.PRNGKey(0), (60, 8, 8, 2))
    params = model.init(jax.random.PRNGKey(1), images[:1])["params"]
    network = nettrim.prune_network(model, params, images, kept_fraction=0.5, layers=["conv1"],
                                    solver=solve_layer_units, heldout=0.0, progress=False)
    kernel = np.asarray(network.params["conv1"]["kernel"])  # (3, 3, 8, 6)
    channels = np.any(kernel != 0, axis=(0, 1, 3))
    assert channels.sum() == 4  # half of conv0's 8 channels, each with all 3·3·6 weights
    assert np.all(np.any(kernel[:, :, channels] != 0, axis=(0, 1, 3)))


@pytest.mark.slow
def test_pruned_units_are_compacted_away_with_the_same_outputs():
    model = MLP(hidden=(48, 32), num_classes=5, input_shape=(6, 6, 1))
    images = jax.random.uniform(jax.random.PRNGKey(0), (800, 6, 6, 1))
    params = model.init(jax.random.PRNGKey(1), images[:1])["params"]
    network = nettrim.prune_network(model, params, images, kept_fraction=0.5,
                                    layers=["dense1", "dense2"], solver=solve_layer_units,
                                    scheme="cascade", progress=False)
    for layer, units in (("dense1", 24), ("dense2", 16)):
        report = network.layers[layer]
        assert report.measured <= report.epsilon_certified  # checked by a real forward pass too
        assert np.any(np.asarray(network.params[layer]["kernel"]) != 0, axis=1).sum() == units
    compacted = compact_lib.compact(model, network.params, images[:1])
    # dense1 reads 24 of dense0's 48 units: dense0 computes 24; dense2 reads 16 of 32.
    assert compacted.layers["dense0"].kernel.shape[-1] == 24
    assert compacted.layers["dense1"].kernel.shape == (24, 16)
    np.testing.assert_allclose(compacted.apply(images),
                               model.apply({"params": network.params}, images),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_attention_output_projection_loses_whole_heads_and_compaction_drops_their_q_k_v():
    from hoyertrim.models import TransformerBlock
    model = TransformerBlock(heads=4, mlp=16)
    tokens = jax.random.normal(jax.random.PRNGKey(0), (60, 5, 16))
    params = model.init(jax.random.PRNGKey(1), tokens[:1])["params"]
    network = nettrim.prune_network(model, params, tokens, kept_fraction=0.5,
                                    layers=["attn/out"], solver=solve_layer_units,
                                    heldout=0.0, progress=False)
    report = network.layers["attn/out"]
    assert report.measured <= report.epsilon_certified
    kernel = np.asarray(network.params["attn"]["out"]["kernel"])  # (heads, head dim, D)
    heads = np.any(kernel != 0, axis=(1, 2))
    assert heads.sum() == 2  # whole heads, every (dim, output) weight of a kept head
    assert np.all(kernel[heads] != 0)
    compacted = compact_lib.compact(model, network.params, tokens[:1])
    for name in ("attn/query", "attn/key", "attn/value"):
        assert compacted.layers[name].kernel.shape == (16, 2, 4)
    np.testing.assert_allclose(compacted.apply(tokens),
                               model.apply({"params": network.params}, tokens),
                               rtol=1e-5, atol=1e-5)
