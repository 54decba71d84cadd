"""One-shot peers (magnitude, Wanda, SparseGPT) against cases computed independently."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hoyertrim import masks, nettrim, peers


def _damped_hessian(x, damping=0.01):
    h = x.T @ x
    return h + damping * np.mean(np.diag(h)) * np.eye(len(h))


def test_sparsegpt_removing_one_weight_is_the_obs_update():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 5))
    w = rng.normal(size=(5, 1)) + 2.0
    w[0] = 0.01  # the lowest saliency w²/[H⁻¹]_qq: the one weight pruned at 4/5 kept
    h_inv = np.linalg.inv(_damped_hessian(x))
    obs = w[:, 0] - (w[0, 0] / h_inv[0, 0]) * h_inv[:, 0]  # Optimal Brain Surgeon, closed form
    got = peers.sparsegpt_kernel(x, w, kept_fraction=0.8)
    np.testing.assert_allclose(got[:, 0], obs, atol=1e-12)
    assert got[0, 0] == 0


def test_sparsegpt_keeps_everything_at_kept_fraction_one():
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(30, 6)), rng.normal(size=(6, 3))
    np.testing.assert_allclose(peers.sparsegpt_kernel(x, w, kept_fraction=1.0), w, atol=1e-12)


def test_wanda_scores_by_hand():
    x = np.array([[3.0, 0.0, 1.0], [4.0, 1.0, 0.0]])  # input norms 5, 1, 1
    w = np.array([[0.1, 1.0], [0.4, -0.3], [-0.2, 0.2]])
    # scores: row0 0.5 / 5.0, row1 0.4 / 0.3, row2 0.2 / 0.2 → keep one input per output unit
    mask = peers.wanda_mask(x, w, kept_fraction=1 / 3)
    np.testing.assert_array_equal(mask, [[True, True], [False, False], [False, False]])
    # Magnitude alone would keep row 1 in the first column: the input norm is what differs.
    assert peers.magnitude_mask(w[:, :1], kept_fraction=1 / 3)[1, 0]


@settings(deadline=None, max_examples=25)
@given(st.integers(0, 10_000), st.sampled_from([(1, 4), (2, 4), (4, 8), (3, 4)]))
def test_nm_masks_are_valid_by_construction(seed, nm):
    n, m = nm
    rng = np.random.default_rng(seed)
    x, w = rng.normal(size=(20, 16)), rng.normal(size=(16, 3))
    for kernel in (np.where(peers.magnitude_mask(w, nm=nm), w, 0),
                   np.where(peers.wanda_mask(x, w, nm=nm), w, 0),
                   peers.sparsegpt_kernel(x, w, nm=nm, block_size=8)):
        groups = (kernel != 0).reshape(16 // m, m, 3).sum(axis=1)
        assert np.all(groups == n)


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="multiple of M"):
        peers.magnitude_layer(np.ones((4, 6)), np.ones((4, 2)), trained_kernel=np.ones((6, 2)),
                              nm=(2, 4))
    with pytest.raises(ValueError, match="exactly one"):
        peers.wanda_layer(np.ones((4, 8)), np.ones((4, 2)), trained_kernel=np.ones((8, 2)))


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(24)(x.reshape((x.shape[0], -1))))
        return nn.Dense(8)(x)


@pytest.mark.parametrize("solver, scheme", [
    (peers.sparsegpt_layer, "cascade"), (peers.wanda_layer, "parallel"),
    pytest.param(peers.magnitude_layer, "parallel", marks=pytest.mark.slow),
    pytest.param(peers.sparsegpt_layer, "parallel", marks=pytest.mark.slow),
    pytest.param(peers.wanda_layer, "cascade", marks=pytest.mark.slow),
    pytest.param(peers.magnitude_layer, "cascade", marks=pytest.mark.slow)])
def test_peers_run_through_prune_network_with_checked_reports(solver, scheme):
    rng = np.random.default_rng(2)
    images = rng.normal(size=(300, 4, 4, 2)).astype(np.float32)
    model = _MLP()
    params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
    pruned = nettrim.prune_network(model, params, images, kept_fraction=0.25, scheme=scheme,
                                   solver=solver, heldout=0.2, progress=False)
    for name, layer in pruned.layers.items():
        assert layer.kept_weights == round(0.25 * layer.weights)
        assert layer.measured <= layer.epsilon_certified * (1 + 1e-4) + 1e-6  # checked forward pass
    nm = nettrim.prune_network(model, params, images, kept_fraction=0.5, scheme=scheme,
                               solver=solver, nm=(2, 4), heldout=0, progress=False)
    kernel = np.asarray(nm.params["Dense_0"]["kernel"])
    assert np.all((kernel != 0).reshape(8, 4, 24).sum(axis=1) == 2)


@settings(deadline=None, max_examples=20)
@given(st.integers(0, 10_000), st.integers(1, 4), st.sampled_from([8, 128]))
def test_sparsegpt_pruning_leading_inputs_is_the_optimal_refit(seed, k, block_size):
    """When the pruned weights are the first k inputs (in SparseGPT's walking order), its
    sequential OBS updates compose to the exact minimizer of (W − Ŵ)ᵀH(W − Ŵ) with Ŵ zero there:
    Ŵ_S = W_S + H_SS⁻¹ H_SP W_P (H damped), per output unit. (One block: with several, SparseGPT
    spreads the pruned count evenly over the blocks, so the mask is another.)"""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(60, 8)) @ rng.normal(size=(8, 8))  # correlated inputs
    w = rng.normal(size=(8, 3)) + 3.0 * np.sign(rng.normal(size=(8, 3)))
    w[:k] = 1e-4 * rng.normal(size=(k, 3))  # the lowest saliencies: these are pruned
    h = _damped_hessian(x)
    pruned, kept = np.arange(k), np.arange(k, 8)
    expected = np.zeros_like(w)
    expected[kept] = w[kept] + np.linalg.solve(h[np.ix_(kept, kept)], h[np.ix_(kept, pruned)]
                                               @ w[pruned])
    got = peers.sparsegpt_kernel(x, w, kept_fraction=(8 - k) / 8, block_size=block_size)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-9)


@settings(deadline=None, max_examples=20)
@given(st.integers(0, 10_000), st.sampled_from([0.3, 0.5, 0.7]), st.sampled_from([4, 8, 128]))
def test_sparsegpt_meets_the_layer_count_across_blocks(seed, kept, block_size):
    rng = np.random.default_rng(seed)
    x, w = rng.normal(size=(50, 24)), rng.normal(size=(24, 6))
    kernel = peers.sparsegpt_kernel(x, w, kept_fraction=kept, block_size=block_size)
    assert np.count_nonzero(kernel) == round(kept * w.size)


def test_nettrim_nm_recovers_a_planted_two_four_neuron_layer():
    """y = relu(x·W*) with W* exactly 2:4: Net-Trim's N:M mode finds W*'s pattern and re-fits
    the weights to (near) zero discrepancy."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    planted = rng.normal(size=(16, 3)) * masks.nm_mask(rng.random((16, 3)), 2, 4)
    y = np.maximum(x @ planted, 0)
    solution = nettrim.solve_layer_nm(x, y, nm=(2, 4), fit_bias=False,
                                      options=nettrim.SolverOptions(maxiter=2000, tol=1e-7))
    kernel = solution.kernel
    assert np.all((kernel != 0).reshape(4, 4, 3).sum(axis=1) <= 2)
    np.testing.assert_array_equal(kernel != 0, planted != 0)
    assert solution.discrepancy < 1e-2


@pytest.mark.slow
def test_nettrim_nm_through_prune_network():
    rng = np.random.default_rng(5)
    images = rng.normal(size=(300, 4, 4, 2)).astype(np.float32)
    model = _MLP()
    params = model.init(jax.random.PRNGKey(1), images[:1])["params"]
    pruned = nettrim.prune_network(model, params, images, kept_fraction=0.5, nm=(2, 4),
                                   solver=nettrim.solve_layer_nm, heldout=0, progress=False)
    kernel = np.asarray(pruned.params["Dense_0"]["kernel"])
    assert np.all((kernel != 0).reshape(8, 4, 24).sum(axis=1) <= 2)
    for layer in pruned.layers.values():
        assert layer.measured <= layer.epsilon_certified * (1 + 1e-4) + 1e-6
