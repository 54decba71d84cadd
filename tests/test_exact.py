"""Net-Trim's exact program (an LP solved by interior point) against CVXPY."""

import cvxpy as cp
import jax
import numpy as np
import pytest

from hoyertrim.nettrim import exact


def _planted(seed, n, s, p):
    rng = np.random.default_rng(seed)
    w = np.zeros(n)
    w[rng.choice(n, s, replace=False)] = rng.normal(size=s)
    x = rng.normal(size=(p, n))
    return x, w


@pytest.mark.parametrize("seed, n, s, p", [
    (0, 30, 3, 12), pytest.param(2, 25, 5, 10, marks=pytest.mark.slow),
    pytest.param(1, 40, 4, 30, marks=pytest.mark.slow),
    pytest.param(3, 20, 2, 40, marks=pytest.mark.slow)])
def test_relu_program_matches_cvxpy(seed, n, s, p):
    x, planted = _planted(seed, n, s, p)
    y = np.maximum(x @ planted, 0)
    w = cp.Variable(n)
    active = y > 0
    cp.Problem(cp.Minimize(cp.norm1(w)), [x[active] @ w == y[active],
                                          x[~active] @ w <= 0]).solve()
    with jax.enable_x64(True):
        got, gap = jax.jit(exact.nettrim_neuron)(x, y)
        got = np.asarray(got)  # float64, also outside the x64 context
    assert got.dtype == np.float64 and float(gap) < 1e-8
    # Same optimal value and, where the minimizer is unique, the same point.
    assert np.abs(got).sum() == pytest.approx(np.abs(w.value).sum(), rel=1e-6)
    np.testing.assert_allclose(got, w.value, atol=1e-5 * max(1, np.abs(w.value).max()))
    assert np.all(x[active] @ got == pytest.approx(y[active], abs=1e-7))
    assert np.all(x[~active] @ got <= 1e-7)


@pytest.mark.parametrize("seed, n, s, p", [pytest.param(4, 30, 3, 10, marks=pytest.mark.slow),
                                           pytest.param(5, 40, 6, 25, marks=pytest.mark.slow)])
def test_basis_pursuit_matches_cvxpy(seed, n, s, p):
    x, planted = _planted(seed, n, s, p)
    y = x @ planted
    w = cp.Variable(n)
    cp.Problem(cp.Minimize(cp.norm1(w)), [x @ w == y]).solve()
    with jax.enable_x64(True):
        got, gap = exact.basis_pursuit(x, y)
        got = np.asarray(got)
    assert float(gap) < 1e-8
    assert np.abs(got).sum() == pytest.approx(np.abs(w.value).sum(), rel=1e-6)
    np.testing.assert_allclose(got, w.value, atol=1e-5 * max(1, np.abs(w.value).max()))


@pytest.mark.slow
def test_vmapped_recovery_from_enough_samples():
    """Theorem 3's regime: many samples, a sparse neuron: every trial recovers it exactly."""
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.PRNGKey(0), 8)

        def trial(key):
            k1, k2, k3 = jax.random.split(key, 3)
            w = jax.random.normal(k1, (30,)) * (jax.random.permutation(k2, 30) < 3)
            x = jax.random.normal(k3, (40, 30))
            got, _ = exact.nettrim_neuron(x, jax.nn.relu(x @ w))
            return jax.numpy.linalg.norm(got - w) / jax.numpy.linalg.norm(w)

        errors = jax.jit(jax.vmap(trial))(keys)
    assert float(errors.max()) < 1e-6
