"""Structured Net-Trim: the fewest input units of a layer whose outputs stay within ε.

Net-Trim's layer program with the ℓ1 norm replaced by a group norm over the layer's *input
units* — the rows of the layer matrix that read one unit of the previous layer (one row of a
Dense kernel; the kh·kw rows of a convolution's input channel):

    min_U  Σ_g ‖diag(‖x_i‖) U_g‖_F     s.t.   ‖act(X U + b + offset) − y‖_F ≤ ε‖y‖_F,

(act = relu with the inactive entries held below v, or the identity: the same two programs as
`search.solve_layer`). Each group's rows are weighted by their input norms, so a unit is charged
for what it contributes to the output, not for the scale of its weights. The Lagrangian form is
solved by FISTA (`jaxopt.ProximalGradient`) on the whole layer — the group norm couples the
output neurons, so they are not solved one by one — with the proximal step of the group norm
(each group's rows shrunk together: U_g ← U_g·max(0, 1 − λ/‖U_g‖)). The multiplier λ is
searched; at each λ the kept units' weights are re-fit without penalty (least squares for the
linear program, FISTA with λ = 0 on the kept rows for the ReLU program), which removes the
shrinkage and lets a larger λ (fewer units) meet ε. In unit-count mode (``kept_fraction``: the
fraction of the units kept) the units kept are exactly that many: the largest groups of the
solution at the smallest λ that keeps at least that many.

A removed unit's rows are exact zeros in every output neuron, so its producer's unit is read by
no one and `compact` removes it: a smaller *dense* model with the layer's certificate — measured
on the returned weights (`problem.measure`), never assumed.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import jaxopt
import numpy as np

from hoyertrim.nettrim.gram import GramStats
from hoyertrim.nettrim.problem import LayerSolution, NormalizedLayer, layer_data, measure, \
    residual
from hoyertrim.nettrim.search import SolverOptions

__all__ = ["solve_layer_units"]


def _value_and_grad(u, x, y, v, active):
    r = residual(x @ u, y, v, active)
    return 0.5 * jnp.vdot(r, r), x.T @ r


def _group_prox(u, lam, groups, num_groups, allowed):
    """Each group's rows shrunk by max(0, 1 − λ/‖U_g‖_F); rows of group −1 (the bias) kept."""
    norms = jnp.sqrt(jax.ops.segment_sum(jnp.sum(u * u, axis=1), jnp.maximum(groups, 0),
                                         num_segments=num_groups))
    factor = jnp.maximum(0.0, 1.0 - lam / jnp.maximum(norms, 1e-30))
    scale = jnp.where(groups >= 0, factor[jnp.maximum(groups, 0)], 1.0)
    return u * scale[:, None] * allowed


@functools.partial(jax.jit, static_argnames=("num_groups", "maxiter"))
def _solve(x, y, v, active, u0, lam, groups, allowed, num_groups: int, maxiter: int, tol):
    def prox(u, lam, scaling=1.0):
        return _group_prox(u, lam * scaling, groups, num_groups, allowed)

    solver = jaxopt.ProximalGradient(fun=_value_and_grad, value_and_grad=True, prox=prox,
                                     stepsize=1.0, maxiter=maxiter, tol=tol, acceleration=True,
                                     jit=True)
    u, state = solver.run(u0, lam, x, y, v, active)
    return u, state.iter_num


# A group-norm program converges slower than the element-wise one: more, finer iterations.
UNITS_OPTIONS = SolverOptions(maxiter=500, tol=1e-5, refit_maxiter=1000, max_solves=25)


def solve_layer_units(x=None, y=None, *, groups=None, epsilon: float | None = None,
                      kept_fraction: float | None = None, relu: bool = True, v=None,
                      fit_bias: bool = True, offset=None, support=None,
                      gram: GramStats | None = None, form: str = "auto",
                      options: SolverOptions = UNITS_OPTIONS) -> LayerSolution:
    """Prunes whole input units of one layer (see the module docstring).

    Args:
      x, y, relu, v, fit_bias, offset, support, gram, form: as `search.solve_layer` takes them
        (inputs (P, N) and targets (P, M), or the linear program's Gram sums).
      groups: (N,) the input unit of each row (`LinearMap.input_units`; default: every row its
        own unit).
      epsilon: relative discrepancy in (0, 1) to stay within, with the fewest units.
      kept_fraction: instead, the fraction of the units to keep (exactly round(f·units), at
        least 1); certified at the discrepancy reached.
      options: ``maxiter`` and ``tol`` (FISTA iterations and step tolerance per λ, normalized
        units), ``refit_maxiter`` (the ReLU program's re-fit on the kept units) and
        ``max_solves`` (λ values tried) of a `search.SolverOptions`; the rest is not used.

    Returns:
      A `LayerSolution` whose kernel has whole rows of exact zeros for the removed units and
      whose ``discrepancy`` is measured on the returned weights; ``converged``: the λ solve
      that chose the units met ``tol`` within ``maxiter`` (the kept units' weights are re-fit
      after it, so the certificate does not depend on it).
    """
    started = time.perf_counter()
    maxiter, tol = options.maxiter, options.tol
    if (epsilon is None) == (kept_fraction is None):
        raise ValueError("Give exactly one of epsilon and kept_fraction.")
    if epsilon is not None and not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}.")
    if kept_fraction is not None and not 0 < kept_fraction <= 1:
        raise ValueError(f"kept_fraction must be in (0, 1], got {kept_fraction}.")
    data = layer_data(x, y, v=v, relu=relu, fit_bias=fit_bias, offset=offset, support=support,
                      gram=gram, form=form)
    num_inputs = data.x.shape[1]
    groups = np.arange(num_inputs) if groups is None else np.asarray(groups)
    if groups.shape != (num_inputs,):
        raise ValueError(f"groups must give one unit per input row ({num_inputs}), got shape "
                         f"{groups.shape}.")
    units, row_unit = np.unique(groups, return_inverse=True)
    problem = NormalizedLayer(data, shard=False)
    live = problem.live
    row_groups = np.concatenate([row_unit, [-1]])[live] if data.fit_bias else row_unit[live]
    allowed = jnp.asarray(problem.support, jnp.float32)
    args = (problem.design_n, problem.y_d, problem.v_d, problem.active_d)
    groups_d = jnp.asarray(row_groups, jnp.int32)
    num_groups = len(units)
    y_norm = data.y_norm

    def at(lam, start):
        u, iterations = _solve(*args, start, jnp.float32(lam), groups_d, allowed, num_groups,
                               maxiter, tol)
        return u, int(iterations)

    def kept_units(u) -> np.ndarray:
        """Which units (indices into ``units``) have a nonzero row."""
        rows = np.any(np.asarray(u) != 0, axis=1) & (row_groups >= 0)
        return np.unique(row_groups[rows])

    def refit(keep_units) -> tuple[np.ndarray, float]:
        """Unpenalized weights on the rows of ``keep_units`` (+ bias): real (N [+1], M)."""
        rows = np.isin(row_groups, keep_units) | (row_groups < 0)
        mask = allowed * jnp.asarray(rows, jnp.float32)[:, None]
        if data.relu:
            u, _ = _solve(*args, jnp.zeros_like(problem.start), jnp.float32(0.0), groups_d,
                          mask, num_groups, options.refit_maxiter, tol)
        else:  # least squares on the kept columns, per neuron (support may differ by neuron)
            design = np.asarray(problem.design_n, np.float64)
            targets = np.asarray(problem.y_d, np.float64)
            allowed_np = np.asarray(mask) > 0
            u = np.zeros(allowed_np.shape, np.float32)
            for m in range(targets.shape[1]):
                columns = np.flatnonzero(allowed_np[:, m])
                if len(columns):
                    u[columns, m] = np.linalg.lstsq(design[:, columns], targets[:, m],
                                                    rcond=None)[0]
        real = problem.to_real(u)
        error, _ = measure(data, real, problem.device_data)
        return real, error / y_norm

    gradient = np.asarray(args[0].T @ residual(jnp.zeros_like(args[1]), *args[1:]))
    group_norms = np.sqrt(np.bincount(np.maximum(row_groups, 0), minlength=num_groups,
                                      weights=np.where(row_groups >= 0,
                                                       np.sum(gradient ** 2, axis=1), 0.0)))
    lam_max = float(group_norms.max()) or 1.0
    target = None if kept_fraction is None else max(1, int(round(kept_fraction * num_groups)))
    low, high = math.log(lam_max * 1e-6), math.log(lam_max)
    best = None  # (real weights, discrepancy, λ, kept units)
    start = problem.start
    path, iterations, solves = [], 0, 0
    chosen_iterations = maxiter  # of the λ solve whose units are kept (none yet)
    for _ in range(options.max_solves):
        lam = math.exp(0.5 * (low + high))
        u, used = at(lam, start)
        iterations += used
        solves += 1
        keep = kept_units(u)
        if target is None:
            real, discrepancy = refit(keep)
            path.append({"lam": lam, "discrepancy": discrepancy, "kept_units": len(keep),
                         "iterations": used})
            if discrepancy <= epsilon:
                best, low, start = (real, discrepancy, lam, keep), math.log(lam), u
                chosen_iterations = used
            else:
                high = math.log(lam)
            if best is not None and high - low < 0.05:
                break
        else:
            path.append({"lam": lam, "kept_units": len(keep), "iterations": used})
            if len(keep) >= target:
                low, start = math.log(lam), u
                chosen_iterations = used
                norms = np.sqrt(np.bincount(np.maximum(row_groups, 0), minlength=num_groups,
                                            weights=np.where(row_groups >= 0, np.sum(
                                                np.asarray(u) ** 2, axis=1), 0.0)))
                best = (None, None, lam, np.sort(np.argsort(-norms, kind="stable")[:target]))
                if len(keep) == target:
                    break
            else:
                high = math.log(lam)
    if target is not None:
        if best is None:  # even the smallest λ keeps fewer: keep the largest gradients
            best = (None, None, math.exp(low),
                    np.sort(np.argsort(-group_norms, kind="stable")[:target]))
        real, discrepancy = refit(best[3])
        best = (real, discrepancy, best[2], best[3])
    if best is None:  # ε below what the dense layer reaches: keep every unit, certify that
        real, discrepancy = refit(np.arange(num_groups))
        best = (real, discrepancy, 0.0, np.arange(num_groups))
    real, discrepancy, lam, keep = best
    kernel, bias = problem.split(real)
    kernel = np.where(np.isin(row_unit, keep)[:, None], kernel, 0.0).astype(np.float32)
    real = np.concatenate([kernel, bias[None]]) if data.fit_bias else kernel
    error, violation = measure(data, real, problem.device_data)
    discrepancy = error / y_norm
    certified = discrepancy * (1 + 1e-3) if epsilon is None else epsilon
    return LayerSolution(
        kernel=kernel, bias=np.asarray(bias, np.float32), discrepancy=discrepancy,
        epsilon=certified, feasible=discrepancy <= certified, lam=lam, iterations=iterations,
        converged=chosen_iterations < maxiter, inactive_violation=violation / y_norm,
        kept_fraction=float(np.count_nonzero(kernel) / max(int(data.support.sum()), 1)),
        solves=solves, seconds=time.perf_counter() - started, lam_path=tuple(path))
