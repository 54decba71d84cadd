"""Net-Trim: convex, layer-wise pruning of trained networks with a certified per-layer error.

Aghasi, Abdi, Nguyen & Romberg, "Net-Trim: Convex Pruning of Deep Neural Networks with Performance
Guarantee", NIPS 2017 (journal version SIMODS 2020). For one trained layer with inputs ``X``
(P samples × N features, a ones column appended for the bias), outputs ``Y = relu(X W)`` and active
set Ω = {Y > 0}, Net-Trim finds the sparsest ``U`` with

    ‖(X U − Y)_Ω‖_F ≤ ε      and      (X U)_{Ωᶜ} ≤ V_{Ωᶜ}      (V = 0 in the parallel scheme)

so that ‖relu(X U) − Y‖_F ≤ ε: the pruned layer provably stays within ε of the trained one.

How `solve_layer` solves it. The Lagrangian of the layer-wide ε-ball separates over output neurons
with a single shared multiplier, so for one λ each neuron m solves

    min_u  ½‖(X u − y_m)_{Ω_m}‖² + ½‖relu(X u − v_m)_{Ω_mᶜ}‖² + λ‖u_{:N}‖₁

(the inactive constraint becomes a squared hinge; the bias is not penalized). With one λ for all
neurons this is exactly the Lagrangian of the convex program

    min ‖U‖₁   s.t.   ‖(X U − Y)_Ω‖² + ‖relu(X U − V)_{Ωᶜ}‖² ≤ ε²

whose feasible set contains the paper's and which (for V = 0) *is* the certificate
‖relu(X U) − Y‖_F ≤ ε, so it can only prune more at the same ε. Each λ is solved
by `jaxopt.ProximalGradient` (FISTA, `prox_lasso`, fixed step 1/‖X‖₂² after Jacobi scaling of
the columns, adaptive restart), `vmap`ped over neurons and `jit`ted. The λ that meets ε is found
by a monotone search on log λ (secant steps on the measured log-log slope, or geometric ones, to
bracket ε, then a safeguarded secant inside the bracket), each solve warm-started from the nearest
previous solution; on large P the search starts from the λ, solution and slope of the same search
on random subsamples (2,000, then 500 rows by default). The reported discrepancy is measured on
the returned weights, so the certificate holds whatever the solver's convergence; zeros are exact
because they come from the prox.

`solve_layer_admm` is the paper's constrained-form ADMM (reference and cross-check), and
`prune_network` applies either to every Dense/Conv layer of a Flax model in the parallel or the
cascade scheme.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxopt
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from hoyertrim.models import PatchConv, image_patches


@dataclasses.dataclass
class LayerSolution:
    """Result of pruning one layer.

    Attributes:
      kernel: (N, M) pruned weights; exact zeros where pruned.
      bias: (M,) bias.
      discrepancy: achieved ‖act(x·kernel + bias) − y‖_F / ‖y‖_F.
      epsilon: the requested relative discrepancy.
      feasible: whether ``discrepancy ≤ epsilon``.
      lam: the shared ℓ1 multiplier that was selected (units of the normalized problem).
      iterations: solver iterations on the full data, summed over the λ search.
      converged: whether every neuron of the final solve met ``tol`` before ``maxiter``.
      inactive_violation: ‖relu(x·kernel + bias − v)_{Ωᶜ}‖_F / ‖y‖_F (0 when the inactive
        constraint holds exactly).
      kept_fraction: nonzero fraction of ``kernel``.
      solves: number of (warm-started) solves the λ search made.
      seconds: wall time.
      presolve_iterations: iterations spent on the subsampled presolves (all levels; see
        ``presolve_samples``).
    """

    kernel: np.ndarray
    bias: np.ndarray
    discrepancy: float
    epsilon: float
    feasible: bool
    lam: float
    iterations: int
    converged: bool
    inactive_violation: float
    kept_fraction: float
    solves: int = 0
    seconds: float = 0.0
    presolve_iterations: int = 0

    def summary(self) -> dict:
        """The scalar fields, JSON-ready."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("kernel", "bias")}


def _validate(x, y, epsilon, v):
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"x must be (P, N) and y (P, M); got shapes {x.shape} and {y.shape}.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples P; got {x.shape[0]} "
                         f"and {y.shape[0]}.")
    if v is not None and np.shape(v) != y.shape:
        raise ValueError(f"v must have y's shape {y.shape}, got {np.shape(v)}.")
    for name, a in (("x", x), ("y", y), ("v", v)):
        if a is not None and not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or inf values; clean the layer's signals first.")
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon is relative (‖error‖_F / ‖y‖_F) and must be in (0, 1), "
                         f"got {epsilon}.")
    if not np.any(y != 0):
        raise ValueError("y has no active (nonzero) outputs: the layer is dead on these samples, "
                         "so there is nothing to preserve. Use more or other samples, or drop "
                         "the layer.")
    return x.astype(np.float32), y.astype(np.float32)


def _problem(x, y, epsilon, v, relu):
    """Validated float32 ``x, y, v``, the active set, ``x`` with a ones column, and ‖y‖_F."""
    x, y = _validate(x, y, epsilon, v)
    v = np.zeros_like(y) if v is None else np.asarray(v, np.float32)
    active = (y > 0) if relu else np.ones(y.shape, bool)
    xa = np.concatenate([x, np.ones((x.shape[0], 1), np.float32)], axis=1)
    return x, y, v, active, xa, float(np.linalg.norm(y))


def _residual(z, y, v, active):
    """Active entries: z − y; inactive: the hinge relu(z − v). Its square is the smooth loss."""
    return jnp.where(active, z - y, jax.nn.relu(z - v))


def _value_and_grad(u, x, y, v, active):
    r = _residual(x @ u, y, v, active)
    return 0.5 * jnp.vdot(r, r), x.T @ r


def _solver(maxiter, tol):
    # The data is normalized to ‖X‖₂ = 1, which bounds the smooth part's Lipschitz constant by 1.
    return jaxopt.ProximalGradient(fun=_value_and_grad, value_and_grad=True,
                                   prox=jaxopt.prox.prox_lasso, stepsize=1.0,
                                   maxiter=maxiter, tol=tol, acceleration=True, jit=True)


@functools.partial(jax.jit, static_argnames=("maxiter", "tol"))
def _solve_at(xa, y, v, active, u0, penalty_weights, maxiter, tol):
    """All neurons at one λ: returns U (N+1, M), per-neuron iterations and errors.

    jaxopt's FISTA iterations (`ProximalGradient.update`) with the gradient-based adaptive
    restart of O'Donoghue & Candès (2015): when the momentum points uphill,
    ⟨y_k − x_{k+1}, x_{k+1} − x_k⟩ > 0, the extrapolation is reset. On these lasso-like problems
    that removes FISTA's oscillations and reaches a given accuracy (and sparsity) in fewer
    iterations, at no extra matmul.
    """
    solver = _solver(maxiter, tol)

    def one(u0, y, v, active):
        args = (xa, y, v, active)

        def body(carry):
            u, state = carry
            u_next, next_state = solver.update(u, state, penalty_weights, *args)
            restart = jnp.vdot(state.velocity - u_next, u_next - u) > 0
            next_state = next_state._replace(
                t=jnp.where(restart, 1.0, next_state.t),
                velocity=jnp.where(restart, u_next, next_state.velocity))
            return u_next, next_state

        def keep_going(carry):
            state = carry[1]
            return (state.iter_num < maxiter) & ((state.iter_num == 0) | (state.error > tol))

        state = solver.init_state(u0, penalty_weights, *args)
        u, state = jax.lax.while_loop(keep_going, body, (u0, state))
        return u, state.iter_num, state.error

    return jax.vmap(one, in_axes=(1, 1, 1, 1), out_axes=(1, 0, 0))(u0, y, v, active)


@jax.jit
def _measure(xa, u, y, v, active, relu):
    z = xa @ u
    out = jnp.where(relu, jax.nn.relu(z), z)
    error = jnp.sum(jnp.square(out - y))
    violation = jnp.sum(jnp.square(jnp.where(active, 0.0, jax.nn.relu(z - v))))
    return error, violation


def _neuron_sharding(num_neurons: int):
    """A 1-D mesh over all devices for the neuron axis, or None on one device."""
    devices = jax.devices()
    if len(devices) == 1:
        return None, num_neurons
    mesh = Mesh(np.array(devices), ("neurons",))
    padded = -(-num_neurons // len(devices)) * len(devices)
    return mesh, padded


class _NormalizedLayer:
    """One layer's problem, normalized and on the device, solvable at any λ.

    Normalization makes λ and tol scale-free (‖Y‖_F → √M) and preconditions: each input column
    is scaled by s_i (Jacobi, then ‖X diag(s)‖₂ = 1 so step 1 is exact). Solving for ũ = u / s
    with ℓ1 weights λ·s_i is the same problem, far better conditioned on image data whose pixel
    columns differ in norm by orders of magnitude.
    """

    def __init__(self, x, y, v, active, xa, y_norm, *, relu, maxiter, tol, shard,
                 init_kernel=None, init_bias=None):
        num_inputs, num_neurons = x.shape[1], y.shape[1]
        self.num_inputs, self.num_neurons, self.y_norm = num_inputs, num_neurons, y_norm
        self.relu, self.maxiter = relu, maxiter
        self.y_scale = y_norm / math.sqrt(num_neurons)
        # Inputs that are zero on every sample (e.g. MNIST's border pixels) cannot affect the
        # outputs, so their weights are 0 at the optimum: solve without those columns.
        self.live = np.flatnonzero(np.any(xa != 0, axis=0))
        xa_live = xa[:, self.live]
        gram = xa_live.T.astype(np.float64) @ xa_live
        inverse_norms = 1.0 / np.sqrt(np.diag(gram))
        lipschitz = float(np.linalg.eigvalsh(gram * np.outer(inverse_norms, inverse_norms)).max())
        self.column_scale = (inverse_norms / math.sqrt(lipschitz)).astype(np.float32)
        xa_n = jnp.asarray(xa_live * self.column_scale)

        self.mesh, padded = _neuron_sharding(num_neurons) if shard else (None, num_neurons)
        pad = padded - num_neurons

        def prepare(a, fill=0):
            a = np.pad(a, ((0, 0), (0, pad)), constant_values=fill) if pad else a
            if self.mesh is None:
                return jnp.asarray(a)
            return jax.device_put(a, NamedSharding(self.mesh, PartitionSpec(None, "neurons")))

        self.prepare = prepare
        self.y_d, self.v_d = prepare(y / self.y_scale), prepare(v / self.y_scale)
        self.active_d = prepare(active, False)
        if self.mesh is not None:
            xa_n = jax.device_put(xa_n, NamedSharding(self.mesh, PartitionSpec()))
        self.xa_n = xa_n
        self.start = prepare(self.to_normalized(init_kernel, init_bias))
        # The bias (the ones column, always live and last) is not penalized.
        self.penalty_weights = jnp.asarray(self.column_scale).at[-1].set(0.0)
        # λ that makes u = 0 optimal (for every neuron): the largest gradient entry at zero.
        grad0 = np.asarray(xa_n[:, :-1].T @ np.asarray(
            _residual(jnp.zeros_like(self.y_d), self.y_d, self.v_d, self.active_d)))
        self.lam_max = float(np.max(np.abs(grad0) / self.column_scale[:-1, None]))
        self.abs_tol = tol * float(np.abs(grad0).max())  # in the units of the solver's gradient
        # The unnormalized signals the certificate is measured on, moved to the device once.
        self.measure_data = tuple(jnp.asarray(a) for a in (xa, y, v, active))

    def to_normalized(self, kernel, bias):
        """(N+1, M) real weights (kernel rows, then bias) → the solver's variables."""
        u = np.zeros((self.num_inputs + 1, self.num_neurons), np.float32)
        if kernel is not None:
            u[:self.num_inputs] = np.asarray(kernel)
            if bias is not None:
                u[self.num_inputs] = np.asarray(bias)
        return (u[self.live] / (self.y_scale * self.column_scale[:, None])).astype(np.float32)

    def to_real(self, u):
        """The solver's variables → (N+1, M) real weights; dead inputs get exact zeros."""
        real = np.zeros((self.num_inputs + 1, self.num_neurons), np.float32)
        real[self.live] = (np.asarray(u)[:, :self.num_neurons] * self.column_scale[:, None]
                           * self.y_scale)
        return real

    def solve(self, lam, start):
        """Solves at ``lam`` from ``start`` (normalized, device); returns a result dict."""
        u, iters, errors = _solve_at(self.xa_n, self.y_d, self.v_d, self.active_d, start,
                                     lam * self.penalty_weights, self.maxiter, self.abs_tol)
        u_real = self.to_real(u)
        xa, y, v, active = self.measure_data
        error, violation = _measure(xa, jnp.asarray(u_real), y, v, active, self.relu)
        return {"u": u, "u_real": u_real, "lam": lam, "error": math.sqrt(float(error)),
                "violation": math.sqrt(float(violation)),
                "iterations": int(np.max(iters)), "converged": bool(np.all(errors <= self.abs_tol))}


@dataclasses.dataclass
class _Search:
    """Outcome of a λ search: the largest feasible and smallest infeasible solves, all solves,
    and the local slope d log(discrepancy) / d log(λ) between the last two solves."""

    feasible: dict | None
    infeasible: dict | None
    solves: list
    slope: float | None

    @property
    def best(self) -> dict:
        """The largest feasible solve, else (epsilon not met) the lowest-discrepancy one."""
        return self.feasible or min(self.solves, key=lambda r: r["error"])


def _log_slope(a: dict, b: dict) -> float | None:
    dlam = math.log(a["lam"]) - math.log(b["lam"])
    if abs(dlam) < 1e-9 or min(a["error"], b["error"]) <= 0:
        return None
    slope = (math.log(a["error"]) - math.log(b["error"])) / dlam
    return slope if slope > 1e-3 else None


def _search_lambda(problem: _NormalizedLayer, lam: float, target: float, *, search_tol: float,
                   max_solves: int, lam_range: float, factor: float,
                   slope: float | None = None, bar=None) -> _Search:
    """Finds the largest λ whose solution meets ``target`` (absolute discrepancy), to within
    ``search_tol``.

    Until feasible and infeasible λ bracket the target it steps in log λ — by the local log-log
    slope of discrepancy vs λ when one is known (a secant step, clipped to ``factor``), else by
    ``factor`` — and then interpolates log(error) against log(λ) inside the bracket
    (safeguarded secant). Each solve is warm-started from the nearest previous solution in log λ.
    """
    solves, feasible, infeasible = [], None, None
    lam_max, lam_min = problem.lam_max, problem.lam_max * lam_range
    aim = math.log(target * (1 - search_tol / 2))
    while len(solves) < max_solves:
        start = problem.start
        if solves:
            start = min(solves, key=lambda r: abs(math.log(r["lam"] / lam)))["u"]
        result = problem.solve(lam, start)
        if solves:
            slope = _log_slope(result, solves[-1]) or slope
        solves.append(result)
        if bar is not None:
            bar.update()
            bar.set_postfix(lam=f"{lam:.3g}",
                            discrepancy=f"{result['error'] / problem.y_norm:.4f}")
        if result["error"] <= target:
            if feasible is None or result["lam"] > feasible["lam"]:
                feasible = result
            if result["error"] >= (1 - search_tol) * target:
                break
        elif infeasible is None or result["lam"] < infeasible["lam"]:
            infeasible = result
        if feasible is None or infeasible is None:
            if (feasible is None and lam <= lam_min) or (infeasible is None and lam >= lam_max):
                break  # infeasible at the smallest λ / feasible with everything pruned
            if slope is not None:
                step = (aim - math.log(max(result["error"], 1e-30))) / slope
                step = min(max(step, -math.log(factor)), math.log(factor))
            else:
                step = math.log(factor) if feasible is not None else -math.log(factor)
            lam = min(max(lam * math.exp(step), lam_min), lam_max)
            # A slope step that lands back inside the known side only wastes a solve.
            if feasible is not None and lam <= feasible["lam"]:
                lam = min(feasible["lam"] * factor, lam_max)
            if infeasible is not None and lam >= infeasible["lam"]:
                lam = max(infeasible["lam"] / factor, lam_min)
        else:
            lo, hi = math.log(feasible["lam"]), math.log(infeasible["lam"])
            if hi - lo < 1e-3:
                break
            e_lo = math.log(max(feasible["error"], 1e-30))
            e_hi = math.log(infeasible["error"])
            t = (aim - e_lo) / max(e_hi - e_lo, 1e-12)
            lam = math.exp(lo + min(max(t, 0.1), 0.9) * (hi - lo))
    return _Search(feasible, infeasible, solves, slope)


_SMALLEST_PRESOLVE = 400  # rows; below this a subsample says too little about the full layer


def _multilevel_search(signals, epsilon, presolve_samples, init, options, search, bar=None):
    """λ search on ``signals`` = (x, y, v, active, xa, ‖y‖_F), started from a search on a random
    subsample of ``presolve_samples`` rows (itself started from one on a 4x smaller subsample,
    down to `_SMALLEST_PRESOLVE` rows): each level hands the next its λ (scaled by √(P ratio),
    the normalization's P-dependence), its solution as warm start and its measured slope, so
    only the smallest level searches from λ_max and every larger one needs a few solves.

    Returns the full-size `_Search` and the iterations spent on the subsamples.
    """
    x, y, v, active, xa, y_norm = signals
    num_samples = x.shape[0]
    init_kernel, init_bias = init
    lam, slope, factor, presolve_iterations = None, None, 8.0, 0
    if presolve_samples and num_samples > 2 * presolve_samples:
        rows = np.sort(np.random.default_rng(0).choice(num_samples, presolve_samples, False))
        if np.any(y[rows] != 0):
            smaller = presolve_samples // 4
            small, small_iterations = _multilevel_search(
                (x[rows], y[rows], v[rows], active[rows], xa[rows],
                 float(np.linalg.norm(y[rows]))), epsilon,
                smaller if smaller >= _SMALLEST_PRESOLVE else None, init, options, search)
            presolve_iterations = small_iterations + sum(r["iterations"] for r in small.solves)
            best = small.best
            init_kernel, init_bias = best["u_real"][:-1], best["u_real"][-1]
            lam = best["lam"] * math.sqrt(num_samples / presolve_samples)
            slope, factor = small.slope, 2.0
    problem = _NormalizedLayer(x, y, v, active, xa, y_norm, init_kernel=init_kernel,
                               init_bias=init_bias, **options)
    lam = problem.lam_max if lam is None else min(lam, problem.lam_max)
    found = _search_lambda(problem, lam, epsilon * y_norm, factor=factor, slope=slope, bar=bar,
                           **search)
    return found, presolve_iterations


def solve_layer(x, y, *, epsilon: float, relu: bool = True, v=None, maxiter: int = 300,
                tol: float = 1e-4, search_tol: float = 0.03, max_solves: int = 30,
                lam_range: float = 1e-6, init_kernel=None, init_bias=None,
                presolve_samples: int | None = 2000, shard: bool = True,
                progress: bool = False) -> LayerSolution:
    """Prunes one layer: the sparsest kernel whose outputs stay within ``epsilon`` of ``y``.

    Args:
      x: (P, N) layer inputs.
      y: (P, M) the trained layer's outputs, post-ReLU (``relu=True``) or the pre-activation
        logits of a linear layer (``relu=False``: every entry is active).
      epsilon: relative discrepancy in (0, 1): ‖act(x·kernel + bias) − y‖_F ≤ epsilon·‖y‖_F.
      relu: whether the layer has a ReLU.
      v: (P, M) inactive-set bound for the cascade scheme (default 0).
      maxiter: FISTA iterations per solve (per λ).
      tol: stopping tolerance of each solve, relative to the largest gradient at zero.
      search_tol: the λ search stops once ``(1 − search_tol)·epsilon ≤ discrepancy ≤ epsilon``.
      max_solves: limit of the λ search.
      lam_range: smallest λ tried, relative to the λ that prunes everything.
      init_kernel, init_bias: warm start for the first solve (e.g. the trained weights).
      presolve_samples: when P exceeds twice this, first run the λ search on this many random
        samples (cheap; itself presolved on 4x fewer, down to a few hundred), then start the full
        search at the λ it found (scaled by √(P / presolve_samples), the normalization's
        P-dependence) from its solution, stepping by the discrepancy-vs-λ slope it measured, so
        the expensive full-size search needs only a few solves. None disables it.
      shard: spread the neuron axis over all devices when there are several.
      progress: show a progress bar of the λ search (one tick per full-size solve).

    Returns:
      A `LayerSolution`. If epsilon cannot be met it has ``feasible=False`` and a warning is
      issued; it then holds the best (lowest-discrepancy) solution found.
    """
    started = time.perf_counter()
    x, y, v, active, xa, y_norm = _problem(x, y, epsilon, v, relu)
    options = dict(relu=relu, maxiter=maxiter, tol=tol, shard=shard)
    search = dict(search_tol=search_tol, max_solves=max_solves, lam_range=lam_range)
    with tqdm(total=max_solves, desc="Net-Trim λ search", unit="solve", leave=False,
              disable=not progress) as bar:
        found, presolve_iterations = _multilevel_search(
            (x, y, v, active, xa, y_norm), epsilon, presolve_samples, (init_kernel, init_bias),
            options, search, bar)
    best = found.best
    if found.feasible is None:
        warnings.warn(f"Net-Trim could not meet epsilon={epsilon:g} for this layer: the best "
                      f"discrepancy reached is {best['error'] / y_norm:.4g} (at λ={best['lam']:.3g},"
                      f" the smallest tried). Raise epsilon, maxiter, or lower lam_range.",
                      stacklevel=2)
    kernel = best["u_real"][:-1]
    return LayerSolution(
        kernel=kernel, bias=best["u_real"][-1], discrepancy=best["error"] / y_norm,
        epsilon=epsilon, feasible=found.feasible is not None, lam=best["lam"],
        iterations=sum(r["iterations"] for r in found.solves), converged=best["converged"],
        inactive_violation=best["violation"] / y_norm,
        kept_fraction=float(np.mean(kernel != 0)), solves=len(found.solves),
        seconds=time.perf_counter() - started, presolve_iterations=presolve_iterations)


def solve_layer_admm(x, y, *, epsilon: float, relu: bool = True, v=None, rho: float = 100.0,
                     maxiter: int = 1000, tol: float = 1e-4) -> LayerSolution:
    """The paper's ADMM on the constrained form (reference solver).

    Solves min ‖U‖₁ s.t. ‖(XU − Y)_Ω‖_F ≤ ε‖Y‖_F, (XU)_{Ωᶜ} ≤ V_{Ωᶜ} by splitting W1 = XU (projected
    onto the constraint set), W2 = U (soft-thresholded, so zeros are exact) and solving the U step
    with a cached Cholesky factor of XᵀX + I, as the official code does. The bias column is
    penalized like the weights here, as in the paper. Data is normalized as in `solve_layer`.
    """
    started = time.perf_counter()
    x, y, v, active, xa, y_norm = _problem(x, y, epsilon, v, relu)
    num_inputs = x.shape[1]
    y_scale = y_norm / math.sqrt(y.shape[1])
    x_scale = math.sqrt(float(np.linalg.eigvalsh(xa.T @ xa.astype(np.float64)).max()))
    xa_n, y_n, v_n = xa / x_scale, y / y_scale, v / y_scale
    radius = epsilon * math.sqrt(y.shape[1])
    result = _admm(jnp.asarray(xa_n), jnp.asarray(y_n), jnp.asarray(v_n), jnp.asarray(active),
                   radius, rho, maxiter, tol)
    u, iters, primal = result
    u_real = np.asarray(u) * (y_scale / x_scale)
    error, violation = _measure(jnp.asarray(xa), jnp.asarray(u_real), jnp.asarray(y),
                                jnp.asarray(v), jnp.asarray(active), relu)
    discrepancy = math.sqrt(float(error)) / y_norm
    kernel = u_real[:num_inputs]
    return LayerSolution(
        kernel=kernel, bias=u_real[num_inputs], discrepancy=discrepancy, epsilon=epsilon,
        feasible=discrepancy <= epsilon * (1 + 1e-3), lam=1.0 / rho, iterations=int(iters),
        converged=bool(primal <= tol), inactive_violation=math.sqrt(float(violation)) / y_norm,
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


# ----------------------------------------------------------------------------- network level


@dataclasses.dataclass(frozen=True)
class _Layer:
    name: str  # module path, e.g. "dense0"
    kind: str  # "dense" or "conv"
    kernel_size: tuple[int, ...]


def _module_path(module: nn.Module) -> str:
    return "/".join(module.path)


def _prunable_layer(module: nn.Module):
    if isinstance(module, nn.Dense):
        return "dense", ()
    if isinstance(module, PatchConv):
        return "conv", tuple(module.kernel_size)
    if isinstance(module, nn.Conv):
        strides = module.strides or 1
        if module.padding != "VALID" or any(s != 1 for s in np.atleast_1d(strides)) or (
                module.kernel_dilation not in (None, 1)) or module.feature_group_count != 1:
            raise NotImplementedError(
                f"Net-Trim supports VALID, stride-1, undilated, ungrouped convolutions; layer "
                f"{_module_path(module)!r} is not one.")
        return "conv", tuple(module.kernel_size)
    return None


def capture_layers(model: nn.Module, variables: Mapping, images) -> dict[str, tuple]:
    """Runs ``model`` on ``images`` and returns ``{layer: (inputs, pre_activations, layer)}`` for
    every Dense/Conv layer, in call order, by intercepting the modules' ``__call__``.

    No per-model plumbing: any linen model built from these modules works.
    """
    captured = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            kind = _prunable_layer(context.module)
            if kind is not None:
                name = _module_path(context.module)
                captured[name] = (args[0], out, _Layer(name, *kind))
        return out

    with nn.intercept_methods(interceptor):
        model.apply(variables, images)
    return captured


def _as_matrix(layer: _Layer, inputs, outputs, sample_rows: np.ndarray | None):
    """(P, N) inputs and (P, M) outputs; conv layers as patches (one row per output position).

    For conv layers only the sampled patches are extracted, so memory stays bounded by
    ``len(sample_rows)`` rows however many images and positions there are.
    """
    z = np.asarray(outputs).reshape(-1, np.shape(outputs)[-1])
    if layer.kind == "conv":
        if sample_rows is None:
            x = np.asarray(image_patches(jnp.asarray(inputs), layer.kernel_size))
            x = x.reshape(z.shape[0], -1)
        else:
            x = np.asarray(_sampled_patches(jnp.asarray(inputs), layer.kernel_size,
                                            jnp.asarray(sample_rows)))
    else:
        x = np.asarray(inputs).reshape(z.shape[0], -1)
        x = x if sample_rows is None else x[sample_rows]
    return x, (z if sample_rows is None else z[sample_rows])


@functools.partial(jax.jit, static_argnums=1)
def _sampled_patches(images, kernel_size, rows):
    """Patches of the output positions ``rows`` (flat indices over (B, H', W')), (kh·kw·C) each,
    in the (kh, kw, C) order of `image_patches`."""
    _, height, width, channels = images.shape
    kh, kw = kernel_size
    out_w = width - kw + 1
    positions = (height - kh + 1) * out_w
    b, rest = rows // positions, rows % positions
    i, j = rest // out_w, rest % out_w
    return jax.vmap(lambda b, i, j: jax.lax.dynamic_slice(
        images, (b, i, j, 0), (1, kh, kw, channels)).reshape(-1))(b, i, j)


def _get(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set(tree, path: str, leaf_name: str, value):
    node = tree
    for key in path.split("/"):
        node = node[key]
    node[leaf_name] = value


@dataclasses.dataclass
class PrunedNetwork:
    """Output of `prune_network`: pruned params, masks (True = kept) and per-layer reports."""

    params: Any
    masks: Any
    layers: dict[str, dict]
    scheme: str

    def report(self) -> dict:
        total = sum(r["weights"] for r in self.layers.values())
        kept = sum(r["kept_weights"] for r in self.layers.values())
        return {"scheme": self.scheme, "layers": self.layers, "weights": total,
                "kept_weights": kept, "kept_fraction": kept / total}


def prune_network(model: nn.Module, params, images, *, epsilon: float | Sequence[float],
                  scheme: str = "parallel", gamma: float = 1.1, layers: Sequence[str] | None = None,
                  max_rows: int = 20000, key=None, solver: Callable = solve_layer,
                  progress: bool = True, **solver_kwargs) -> PrunedNetwork:
    """Net-Trim over a Flax model's Dense/Conv layers.

    Args:
      model: a linen model whose hidden layers are followed by ReLU and whose last layer is linear
        (the Net-Trim setting: MLPs, LeNet-5).
      params: the trained ``params``.
      images: (P, ...) samples whose layer signals define the problems (e.g. training images).
      epsilon: relative discrepancy, one for all layers or one per layer. In the cascade scheme
        it is used for the first layer; later layers use the γ rule below.
      scheme: ``"parallel"`` (every layer sees the trained network's signals; layers independent)
        or ``"cascade"`` (each layer sees the already-pruned layers' outputs, its target is the
        trained output, ``v = x̂·W`` and ε_ℓ² = γ·‖(x̂W − y)_Ω‖², so the trained weights stay
        feasible).
      gamma: the cascade inflation γ > 1.
      layers: names of the layers to prune (default: all Dense/Conv layers).
      max_rows: conv layers give P·H·W patch rows; a random subset of this size is used.
      key: PRNG key for that subset.
      solver: `solve_layer` or `solve_layer_admm`.
      **solver_kwargs: passed to the solver.

    Returns:
      A `PrunedNetwork`; every layer's report holds its `LayerSolution.summary()`, weight counts
      and solve time.
    """
    if scheme not in ("parallel", "cascade"):
        raise ValueError(f"scheme must be 'parallel' or 'cascade', got {scheme!r}.")
    if scheme == "cascade" and gamma <= 1:
        raise ValueError(f"gamma must be > 1 so the trained weights stay feasible, got {gamma}.")
    key = jax.random.PRNGKey(0) if key is None else key
    variables = {"params": params}
    original = capture_layers(model, variables, images)
    names = list(original) if layers is None else list(layers)
    unknown = sorted(set(names) - set(original))
    if unknown:
        raise ValueError(f"Unknown layers {unknown}; prunable layers are {list(original)}.")
    epsilons = [epsilon] * len(names) if np.isscalar(epsilon) else list(epsilon)
    if len(epsilons) != len(names):
        raise ValueError(f"Got {len(epsilons)} epsilons for {len(names)} layers.")
    last = list(original)[-1]
    pruned = jax.tree.map(np.array, params)  # mutable numpy copy
    reports = {}
    bar = tqdm(names, desc=f"Net-Trim ({scheme})", unit="layer", disable=not progress)
    for index, (name, eps) in enumerate(zip(bar, epsilons)):
        inputs, z, layer = original[name]
        relu = name != last
        rows = np.prod(np.shape(z)[:-1])
        sample_rows = None
        if rows > max_rows:
            sample_rows = np.sort(np.asarray(jax.random.choice(
                jax.random.fold_in(key, index), rows, (max_rows,), replace=False)))
        x, z = _as_matrix(layer, inputs, z, sample_rows)
        y = np.maximum(z, 0) if relu else z
        kernel = np.asarray(_get(params, name)["kernel"])
        bias = np.asarray(_get(params, name)["bias"])
        flat_kernel = kernel.reshape(-1, kernel.shape[-1])
        v = None
        if scheme == "cascade" and index > 0:
            current = capture_layers(model, {"params": pruned}, images)
            x_hat, _ = _as_matrix(layer, current[name][0], current[name][1], sample_rows)
            v = x_hat @ flat_kernel + bias
            residual = (np.maximum(v, 0) if relu else v) - y
            eps = math.sqrt(gamma) * float(np.linalg.norm(
                np.where(y > 0, residual, 0) if relu else residual)) / float(np.linalg.norm(y))
            eps = min(max(eps, 1e-6), 0.999)
            x = x_hat
            v = v if relu else None
        if solver is solve_layer:
            solver_kwargs.setdefault("progress", progress)
        solution = solver(x, y, epsilon=eps, relu=relu, v=v, **solver_kwargs)
        _set(pruned, name, "kernel", solution.kernel.reshape(kernel.shape).astype(kernel.dtype))
        _set(pruned, name, "bias", solution.bias.astype(bias.dtype))
        reports[name] = {**solution.summary(), "samples": int(x.shape[0]),
                         "weights": int(kernel.size),
                         "kept_weights": int(np.count_nonzero(solution.kernel))}
        bar.set_postfix(layer=name, kept=f"{solution.kept_fraction:.3f}",
                        disc=f"{solution.discrepancy:.3f}")
    pruned = jax.tree.map(jnp.asarray, pruned)
    masks = jax.tree_util.tree_map_with_path(
        lambda path, p: (p != 0) if getattr(path[-1], "key", None) == "kernel"
        else jnp.ones(p.shape, bool), pruned)
    return PrunedNetwork(params=pruned, masks=masks, layers=reports, scheme=scheme)


def save_pruned(directory, network: PrunedNetwork) -> None:
    """Writes ``params`` and ``masks`` (orbax) and the per-layer report (JSON) to ``directory``."""
    import orbax.checkpoint as ocp
    import pathlib
    path = pathlib.Path(directory).expanduser().absolute()
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(path, ocp.args.Composite(
            params=ocp.args.StandardSave(network.params),
            masks=ocp.args.StandardSave(network.masks),
            report=ocp.args.JsonSave(network.report())), force=True)


def load_pruned(directory, params_template) -> PrunedNetwork:
    """Restores what `save_pruned` wrote, into the structure of ``params_template``."""
    import orbax.checkpoint as ocp
    import pathlib
    path = pathlib.Path(directory).expanduser().absolute()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, params_template)
    mask_abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.bool_),
                                 params_template)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(path, ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract),
            masks=ocp.args.StandardRestore(mask_abstract),
            report=ocp.args.JsonRestore()))
    report = restored["report"]
    return PrunedNetwork(params=restored["params"], masks=restored["masks"],
                         layers=report["layers"], scheme=report["scheme"])
