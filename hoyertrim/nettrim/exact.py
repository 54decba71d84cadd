"""Net-Trim's exact program for one neuron, as a linear program solved to high accuracy.

For inputs X (P, N) and the trained neuron's outputs y = relu(X w*) with active set Ω = {y > 0},
Net-Trim's ε → 0 program is

    minimize ‖w‖₁   subject to   X_Ω w = y_Ω,   X_Ωᶜ w ≤ 0,

and basis pursuit (the linear reference: every sample an equality) is ``minimize ‖w‖₁ s.t.
X w = y``. Theorem 3 of Net-Trim (Aghasi et al., 2020) says that for Gaussian X and an s-sparse
w*, the program recovers w* exactly once P = O(s log(N/s)).

`solve_l1` writes either program in standard form — w = u − v, one slack per inequality row —

    minimize 1ᵀu + 1ᵀv   s.t.   X(u − v) + diag(d)·r = b,   u, v, r ≥ 0,

(d = 1 on inequality rows; an equality row's unused slack costs 1, so it ends at 0) and solves it
with Mehrotra's predictor-corrector interior-point method in float64: pure array code in a
`jax.lax.fori_loop` of ``iterations`` steps (a converged problem keeps its iterate), so it runs
under `jax.jit` and `jax.vmap` over many problems at once.
``jax_enable_x64`` must be on (the experiment and the tests turn it on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _step_length(z, dz):
    """Largest α ≤ 1 keeping z + α·dz ≥ 0."""
    ratios = jnp.where(dz < 0, -z / jnp.where(dz < 0, dz, -1.0), jnp.inf)
    return jnp.minimum(1.0, jnp.min(ratios))


def solve_l1(x: jax.Array, y: jax.Array, inequality: jax.Array, *, iterations: int = 200,
             tol: float = 1e-10) -> tuple[jax.Array, jax.Array]:
    """Minimizes ‖w‖₁ subject to ``x w = y`` on equality rows and ``x w ≤ y`` on inequality rows.

    Args:
      x: (P, N) float64 inputs.
      y: (P,) float64 right-hand sides (0 on the inactive rows of Net-Trim's program).
      inequality: (P,) bool, True where the row is ``≤``.
      iterations: interior-point steps (each: two P×P Cholesky solves).
      tol: steps stop changing the iterate once its optimality measure is below this.

    Returns:
      ``(w, gap)``: the (N,) minimizer and its optimality measure — the relative duality gap
      |cᵀz − bᵀλ| / (1 + |cᵀz|) plus the relative primal and dual residuals — a check that it
      converged.
    """
    num_rows, num_inputs = x.shape
    slack_cols = inequality.astype(x.dtype)
    a = jnp.concatenate([x, -x, jnp.diag(slack_cols)], axis=1)  # (P, 2N + P)
    c = jnp.concatenate([jnp.ones(2 * num_inputs, x.dtype), 1.0 - slack_cols])
    n = a.shape[1]
    scale = jnp.maximum(1.0, jnp.max(jnp.abs(y)))

    def newton(z, s, lam, r_xs):
        """Solves the Newton system for residuals (rb, rc, r_xs) via the normal equations."""
        rb = a @ z - y
        rc = a.T @ lam + s - c
        d = z / s
        m = (a * d) @ a.T
        m = m + 1e-12 * jnp.trace(m) / num_rows * jnp.eye(num_rows, dtype=x.dtype)
        chol = jax.scipy.linalg.cho_factor(m)
        dlam = jax.scipy.linalg.cho_solve(chol, -rb + a @ (r_xs / s - d * rc))
        ds = -rc - a.T @ dlam
        dz = -r_xs / s - d * ds
        return dz, ds, dlam

    def converged(z, s, lam):
        primal, dual = c @ z, y @ lam
        residual = jnp.linalg.norm(a @ z - y) / (1.0 + jnp.linalg.norm(y))
        dual_residual = jnp.linalg.norm(a.T @ lam + s - c) / (1.0 + jnp.linalg.norm(c))
        return jnp.abs(primal - dual) / (1.0 + jnp.abs(primal)) + residual + dual_residual

    def step(state):
        z, s, lam = state
        mu = z @ s / n
        dz_a, ds_a, _ = newton(z, s, lam, z * s)
        alpha_p, alpha_d = _step_length(z, dz_a), _step_length(s, ds_a)
        mu_aff = (z + alpha_p * dz_a) @ (s + alpha_d * ds_a) / n
        sigma = (mu_aff / mu) ** 3
        dz, ds, dlam = newton(z, s, lam, z * s + dz_a * ds_a - sigma * mu)
        alpha_p = jnp.minimum(1.0, 0.995 * _step_length(z, dz))
        alpha_d = jnp.minimum(1.0, 0.995 * _step_length(s, ds))
        return (jnp.maximum(z + alpha_p * dz, 1e-300), jnp.maximum(s + alpha_d * ds, 1e-300),
                lam + alpha_d * dlam)

    # A fixed trip count (a data-dependent while loop syncs with the host every step on CPU,
    # which stalls when the cores are busy); once converged a problem keeps its iterate.
    # Close to the optimum the normal equations are ill-conditioned (z/s spans 1e±30) and a
    # step can undo the progress (seen: 8e-10 after 10 steps, 0.5 after 200, under vmap), so
    # the iterate with the best optimality measure is the one returned.
    def body(_, carry):
        state, best, best_measure = carry
        new = jax.tree.map(lambda old, new: jnp.where(best_measure < tol, old, new),
                           state, step(state))
        measure = converged(*new)
        better = measure < best_measure  # False for NaN: a failed step never becomes the best
        best = jax.tree.map(lambda old, new: jnp.where(better, new, old), best, new)
        return new, best, jnp.where(better, measure, best_measure)

    start = (jnp.full(n, scale, x.dtype), jnp.ones(n, x.dtype), jnp.zeros(num_rows, x.dtype))
    _, (z, _, _), measure = jax.lax.fori_loop(
        0, iterations, body, (start, start, converged(*start)))
    return z[:num_inputs] - z[num_inputs:2 * num_inputs], measure


def nettrim_neuron(x: jax.Array, y: jax.Array, *, iterations: int = 200):
    """Net-Trim's exact program for one ReLU neuron with outputs ``y`` (P,) ≥ 0: equality on
    the active samples, ``x w ≤ 0`` on the others. Returns ``(w, gap)`` as `solve_l1`."""
    inactive = y <= 0
    return solve_l1(x, jnp.where(inactive, 0.0, y), inactive, iterations=iterations)


def basis_pursuit(x: jax.Array, y: jax.Array, *, iterations: int = 200):
    """minimize ‖w‖₁ s.t. x w = y on every sample. Returns ``(w, gap)`` as `solve_l1`."""
    return solve_l1(x, y, jnp.zeros(y.shape, bool), iterations=iterations)
