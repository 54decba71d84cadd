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


def _planted_neurons(count):
    """``count`` 3-sparse neurons in 30 inputs with 40 Gaussian samples each, stacked."""
    def one(key):
        k1, k2, k3 = jax.random.split(key, 3)
        w = jax.random.normal(k1, (30,)) * (jax.random.permutation(k2, 30) < 3)
        x = jax.random.normal(k3, (40, 30))
        return x, jax.nn.relu(x @ w), w
    return jax.vmap(one)(jax.random.split(jax.random.PRNGKey(0), count))


@pytest.mark.slow
def test_vmapped_recovery_from_enough_samples():
    """Theorem 3's regime: many samples, a sparse neuron: every trial recovers it exactly, and
    says so through its optimality measure."""
    with jax.enable_x64(True):
        x, y, w = _planted_neurons(8)
        got, measure = jax.jit(jax.vmap(exact.nettrim_neuron))(x, y)
        errors = np.linalg.norm(got - w, axis=1) / np.linalg.norm(w, axis=1)
    assert float(errors.max()) < 1e-6
    assert float(measure.max()) < 1e-8


@pytest.mark.slow
def test_more_iterations_never_return_a_worse_iterate():
    """Near the optimum a step can undo the progress (the first of these problems, vmapped,
    went from 8e-10 after 10 steps to 0.14 after 25): the best iterate is kept."""
    with jax.enable_x64(True):
        x, y, _ = _planted_neurons(8)
        measures = [jax.vmap(lambda a, b: exact.nettrim_neuron(a, b, iterations=k)[1])(x, y)
                    for k in (10, 25, 60)]
    for fewer, more in zip(measures, measures[1:]):
        assert np.all(np.asarray(more) <= np.asarray(fewer))
