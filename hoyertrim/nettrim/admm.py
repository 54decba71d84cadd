"""The paper's ADMM on the constrained form: the reference solver `solve_layer` is checked against.

Solves min ‖U‖₁ s.t. ‖(XU − Y)_Ω‖_F ≤ ε‖Y‖_F, (XU)_{Ωᶜ} ≤ V_{Ωᶜ} by splitting W1 = XU (projected
onto the constraint set), W2 = U (soft-thresholded, so zeros are exact) and solving the U step
with a cached Cholesky factor of XᵀX + I, as the official code does (Aghasi et al., ρ = 100).
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from hoyertrim.nettrim.problem import LayerSolution, layer_data, measure


def solve_layer_admm(x, y, *, epsilon: float, relu: bool = True, v=None, rho: float = 100.0,
                     maxiter: int = 1000, tol: float = 1e-4) -> LayerSolution:
    """Prunes one layer with the paper's ADMM (bias column penalized like the weights, as there).

    Args:
      x: (P, N) inputs.  y: (P, M) trained outputs (post-ReLU, or logits with ``relu=False``).
      epsilon: relative discrepancy bound in (0, 1).  v: (P, M) cascade inactive bound.
      rho: ADMM penalty.  maxiter: iteration cap.  tol: primal residual (relative) to stop at.

    Returns:
      A `LayerSolution` whose discrepancy is measured on the returned (soft-thresholded) weights;
      ``converged`` is whether the primal residual reached ``tol``.
    """
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}.")
    started = time.perf_counter()
    data = layer_data(x, y, v=v, relu=relu)
    design, y_norm = data.design, data.y_norm
    num_inputs = data.x.shape[1]
    y_scale = y_norm / math.sqrt(data.y.shape[1])
    x_scale = math.sqrt(float(np.linalg.eigvalsh(design.T @ design.astype(np.float64)).max()))
    radius = epsilon * math.sqrt(data.y.shape[1])
    u, iterations, primal = _admm(jnp.asarray(design / x_scale), jnp.asarray(data.y / y_scale),
                                  jnp.asarray(data.v / y_scale), jnp.asarray(data.active),
                                  radius, rho, maxiter, tol)
    u_real = np.asarray(u) * (y_scale / x_scale)
    error, violation = measure(data, u_real)
    discrepancy = error / y_norm
    kernel = u_real[:num_inputs]
    return LayerSolution(
        kernel=kernel, bias=u_real[num_inputs], discrepancy=discrepancy, epsilon=epsilon,
        feasible=discrepancy <= epsilon * (1 + 1e-3), lam=1.0 / rho, iterations=int(iterations),
        converged=bool(primal <= tol), inactive_violation=violation / y_norm,
        kept_fraction=float(np.mean(kernel != 0)), solves=1,
        seconds=time.perf_counter() - started)


@functools.partial(jax.jit, static_argnames=("maxiter",))
def _admm(xa, y, v, active, radius, rho, maxiter, tol):
    n = xa.shape[1]
    chol = jax.scipy.linalg.cho_factor(xa.T @ xa + jnp.eye(n))

    def project(w1):
        """Onto {‖(W1 − Y)_Ω‖_F ≤ radius, W1_{Ωᶜ} ≤ V}: the two parts are separable."""
        d = jnp.where(active, w1 - y, 0.0)
        norm = jnp.linalg.norm(d)
        shrink = jnp.where(norm > radius, radius / jnp.maximum(norm, 1e-30), 1.0)
        return jnp.where(active, y + shrink * d, jnp.minimum(w1, v))

    def step(carry):
        it, u, w1, w2, l1, l2, _ = carry
        u = jax.scipy.linalg.cho_solve(chol, xa.T @ (w1 - l1) + (w2 - l2))
        xu = xa @ u
        w1 = project(xu + l1)
        w2 = jnp.sign(u + l2) * jax.nn.relu(jnp.abs(u + l2) - 1.0 / rho)
        l1 = l1 + xu - w1
        l2 = l2 + u - w2
        primal = jnp.maximum(jnp.linalg.norm(xu - w1), jnp.linalg.norm(u - w2)) / (
            jnp.linalg.norm(w2) + 1e-12)
        return it + 1, u, w1, w2, l1, l2, primal

    def keep_going(carry):
        return (carry[0] < maxiter) & (carry[-1] > tol)

    u0 = jnp.zeros((n, y.shape[1]))
    init = (0, u0, xa @ u0, u0, jnp.zeros_like(y), u0, jnp.inf)
    it, _, _, w2, _, _, primal = jax.lax.while_loop(keep_going, step, init)
    return w2, it, primal
