"""Choosing the layer's single λ: the search that meets ε (or a kept fraction), and `solve_layer`.

The Lagrangian of the layer-wide ε-ball separates over output neurons with one shared
multiplier, so for one λ each neuron is an independent ℓ1 problem (`fista.solve_at`). With one λ
for all neurons this is exactly the Lagrangian of the convex program

    min ‖U‖₁   s.t.   ‖(X U − Y)_Ω‖² + ‖relu(X U − V)_{Ωᶜ}‖² ≤ ε²‖Y‖²

whose feasible set contains the paper's and which (for V = 0) *is* the certificate
‖relu(X U) − Y‖_F ≤ ε‖Y‖_F. The λ that meets ε is found by a monotone search on log λ (secant
steps on the measured log-log slope, or geometric ones, to bracket ε, then a safeguarded secant
inside the bracket), each solve warm-started from the nearest previous solution; on large P the
search starts from the λ, solution and slope of the same search on random subsamples. The
reported discrepancy is measured on the returned weights, so the certificate holds whatever the
solver's convergence; zeros are exact because they come from the prox.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hoyertrim.masks import check_nm, nm_mask
from hoyertrim.nettrim import gram as gram_lib
from hoyertrim.nettrim.fista import solve_at
from hoyertrim.nettrim.gram import GramStats
from hoyertrim.nettrim.problem import LayerData, LayerSolution, NormalizedLayer, layer_data, measure

KEPT_FRACTION_TOLERANCE = 0.005  # kept-fraction mode: |kept − target| within half a point
_SMALLEST_PRESOLVE = 400  # rows; below this a subsample says too little about the full layer


@dataclasses.dataclass(frozen=True)
class _Goal:
    """What the λ search aims at: a quantity that grows with λ, the largest acceptable value
    (``target``: feasible below it), the band's lower end and the point the secant aims at."""

    value: Callable[[LambdaSolve], float]
    target: float
    low: float
    aim: float

    @staticmethod
    def discrepancy(epsilon: float, y_norm: float, search_tol: float) -> "_Goal":
        target = epsilon * y_norm
        return _Goal(lambda r: r.error, target, (1 - search_tol) * target,
                     target * (1 - search_tol / 2))

    @staticmethod
    def kept(fraction: float) -> "_Goal":
        # The compression 1 / kept grows with λ; feasible = keeps at least the band's low end.
        low_kept = fraction - KEPT_FRACTION_TOLERANCE
        return _Goal(lambda r: 1.0 / max(r.kept_fraction, 1e-9),
                     math.inf if low_kept <= 0 else 1.0 / low_kept,
                     1.0 / (fraction + KEPT_FRACTION_TOLERANCE), 1.0 / fraction)

    @staticmethod
    def kept_at_least(fraction: float, search_tol: float) -> "_Goal":
        # Polish's search: any solve keeping between fraction and (1 + search_tol)·fraction
        # will do, since the polish then cuts it to the count exactly.
        high = min(fraction * (1 + search_tol), 1.0)
        return _Goal(lambda r: 1.0 / max(r.kept_fraction, 1e-9), 1.0 / fraction, 1.0 / high,
                     2.0 / (fraction + high))


class LambdaSolve(NamedTuple):
    """One solve of the λ search: the solution at ``lam`` and what was measured of it.

    ``u`` is the normalized solution (the warm start of the next solve), ``u_real`` the same in
    the layer's units; ``error`` the misfit ‖ẑ − z‖ on the active rows (the same units as
    ``NormalizedLayer.y_norm``), ``violation`` the inactive rows' positive part, ``kept_fraction``
    the fraction of weights nonzero, ``iterations`` the FISTA iterations spent and ``gap`` the
    relative duality gap at the end."""

    u: Any
    u_real: Any
    lam: float
    error: float
    violation: float
    kept_fraction: float
    iterations: int
    gap: float


def solve_at_lambda(problem: NormalizedLayer, lam: float, start, maxiter: int,
                    tol: float) -> LambdaSolve:
    """FISTA on ``problem`` at penalty ``lam`` (absolute, not a fraction of λ_max) from
    ``start``, measured."""
    weights = lam * problem.penalty_weights
    u, iterations, gap = solve_at(problem.design_n, problem.y_d, problem.v_d, problem.active_d,
                                  start, weights, maxiter, problem.abs_tol * tol,
                                  problem.data.floor / problem.y_scale ** 2)
    u_real = problem.to_real(u)
    error, violation = measure(problem.data, u_real, problem.device_data)
    return LambdaSolve(u, u_real, lam, error, violation, problem.kept_fraction(u_real),
                       int(np.max(iterations)), float(gap))


@dataclasses.dataclass
class _Search:
    """Outcome of a λ search: the largest feasible and smallest infeasible solves, all solves,
    and the local slope d log(value) / d log(λ) between the last two solves."""

    feasible: LambdaSolve | None
    infeasible: LambdaSolve | None
    solves: list[LambdaSolve]
    slope: float | None
    goal: _Goal

    @property
    def best(self) -> LambdaSolve:
        """The largest feasible solve, else (the goal not met) the lowest-value one."""
        return self.feasible or min(self.solves, key=self.goal.value)


def _log_slope(a: float, b: float, lam_a: float, lam_b: float) -> float | None:
    dlam = math.log(lam_a) - math.log(lam_b)
    if abs(dlam) < 1e-9 or min(a, b) <= 0 or not math.isfinite(a + b):
        return None
    slope = (math.log(a) - math.log(b)) / dlam
    return slope if slope > 1e-3 else None


def _search_lambda(problem: NormalizedLayer, lam: float, goal: _Goal, *, solve: Callable,
                   max_solves: int, lam_range: float, factor: float,
                   slope: float | None = None, bar=None) -> _Search:
    """Finds the largest λ whose solution has ``goal.value ≤ goal.target``, stopping inside the
    band ``[goal.low, goal.target]``.

    Until feasible and infeasible λ bracket the target it steps in log λ — by the local log-log
    slope when one is known (a secant step, clipped to ``factor``), else by ``factor`` — and then
    interpolates log(value) against log(λ) inside the bracket (safeguarded secant). Each solve is
    warm-started from the nearest previous solution in log λ.
    """
    solves, feasible, infeasible = [], None, None
    lam_max, lam_min = problem.lam_max, problem.lam_max * lam_range
    aim = math.log(goal.aim)
    while len(solves) < max_solves:
        start = problem.start
        if solves:
            start = min(solves, key=lambda r: abs(math.log(r.lam / lam))).u
        result = solve(problem, lam, start)
        value = goal.value(result)
        if solves:
            previous = solves[-1]
            slope = _log_slope(value, goal.value(previous), lam, previous.lam) or slope
        solves.append(result)
        if bar is not None:
            bar.update()
            bar.set_postfix(lam=f"{lam:.3g}", kept=f"{result.kept_fraction:.4f}",
                            discrepancy=f"{result.error / problem.y_norm:.4f}")
        if value <= goal.target:
            if feasible is None or result.lam > feasible.lam:
                feasible = result
            if value >= goal.low:
                break
        elif infeasible is None or result.lam < infeasible.lam:
            infeasible = result
        if feasible is None or infeasible is None:
            if (feasible is None and lam <= lam_min) or (infeasible is None and lam >= lam_max):
                break  # infeasible at the smallest λ / feasible with everything pruned
            if slope is not None and math.isfinite(value):
                step = (aim - math.log(max(value, 1e-30))) / slope
                step = min(max(step, -math.log(factor)), math.log(factor))
            else:
                step = math.log(factor) if feasible is not None else -math.log(factor)
            lam = min(max(lam * math.exp(step), lam_min), lam_max)
            # A slope step that lands back inside the known side only wastes a solve.
            if feasible is not None and lam <= feasible.lam:
                lam = min(feasible.lam * factor, lam_max)
            if infeasible is not None and lam >= infeasible.lam:
                lam = max(infeasible.lam / factor, lam_min)
        else:
            lo, hi = math.log(feasible.lam), math.log(infeasible.lam)
            if hi - lo < 1e-3:
                break
            v_lo = math.log(max(goal.value(feasible), 1e-30))
            v_hi = goal.value(infeasible)
            t = 0.5 if not math.isfinite(v_hi) else (aim - v_lo) / max(math.log(v_hi) - v_lo,
                                                                         1e-12)
            lam = math.exp(lo + min(max(t, 0.1), 0.9) * (hi - lo))
    return _Search(feasible, infeasible, solves, slope, goal)


def _multilevel_search(data: LayerData, make_goal: Callable[[LayerData], _Goal],
                       presolve_samples: int | None, init, options: dict, search: dict,
                       bar=None):
    """λ search on ``data``, started from a search on a random subsample of
    ``presolve_samples`` rows (itself started from one on a 4x smaller subsample, down to
    `_SMALLEST_PRESOLVE` rows): each level hands the next its λ (scaled by √(P ratio), the
    normalization's P-dependence), its solution as warm start and its measured slope, so only the
    smallest level searches from λ_max and every larger one needs a few solves.

    Returns the full-size `_Search`, its `NormalizedLayer` and the iterations spent on the
    subsamples.
    """
    num_samples = data.x.shape[0]
    init_kernel, init_bias = init
    lam, slope, factor, presolve_iterations = None, None, 8.0, 0
    if presolve_samples and num_samples > 2 * presolve_samples and not data.compressed:
        rows = np.sort(np.random.default_rng(0).choice(num_samples, presolve_samples, False))
        subset = data.rows(rows)
        if np.any(subset.y != 0):
            smaller = presolve_samples // 4
            small, small_problem, small_iterations = _multilevel_search(
                subset, make_goal, smaller if smaller >= _SMALLEST_PRESOLVE else None, init,
                options, search)
            presolve_iterations = small_iterations + sum(r.iterations for r in small.solves)
            init_kernel, init_bias = small_problem.split(small.best.u_real)
            lam = small.best.lam * math.sqrt(num_samples / presolve_samples)
            slope, factor = small.slope, 2.0
    problem = NormalizedLayer(data, init_kernel=init_kernel, init_bias=init_bias, **options)
    lam = problem.lam_max if lam is None else min(lam, problem.lam_max)
    found = _search_lambda(problem, lam, make_goal(data), factor=factor, slope=slope, bar=bar,
                           **search)
    return found, problem, presolve_iterations


@dataclasses.dataclass(frozen=True)
class SolverOptions:
    """How `solve_layer` searches and refines (its numerics; the layer and the target are its
    own arguments). `solve_layer_nm` and `units.solve_layer_units` take the same record.

    Attributes:
      maxiter: FISTA iterations per solve (per λ).
      tol: a neuron's solve stops once a FISTA step moves its (normalized) weights by at most
        tol × the largest gradient entry at zero.
      gap_tol: ``converged`` is reported when the layer's relative duality gap at the returned
        λ is at most this (the objective is then provably within this fraction of optimal).
      search_tol: the λ search stops once ``(1 − search_tol)·epsilon ≤ discrepancy ≤ epsilon``;
        default 0.03, or 0.15 with ``polish`` (which removes weights up to epsilon itself, so the
        search only needs a feasible start: usually its first full-size solve). In kept-fraction
        mode with ``polish`` the search stops once it keeps between the fraction and
        (1 + search_tol) times it (the polish cuts to the count); without polish, ±0.005.
      max_solves: limit of the λ search.
      lam_range: smallest λ tried, relative to the λ that prunes everything.
      presolve_samples: when P exceeds twice this, first run the λ search on this many random
        samples (itself presolved on 4x fewer, down to a few hundred), then start the full search
        from its λ (scaled by √(P / presolve_samples)), solution and measured slope. None
        disables it.
      refit: after the λ search, re-fit the kept weights on their support under the same
        constraints at a negligible ℓ1 weight (``refit_lam`` × the λ that prunes everything,
        ``refit_maxiter`` FISTA iterations): ℓ1 also shrinks the weights it keeps, and this
        debiasing lowers the discrepancy at the same support (kept only if it does), so the
        certificate still holds with room to spare. ``LayerSolution.refit`` says what it gave.
      polish: epsilon mode: rounds of debias-then-threshold after the λ search (`_polish`): the
        kept weights are re-fit on their support (``polish_maxiter`` FISTA iterations at
        ``refit_lam``), then the smallest are removed while the measured discrepancy stays
        ≤ epsilon. Each round costs about ``polish_maxiter`` full-size iterations and removes
        what ℓ1's shrinkage had made necessary: on MNIST's first layer one round kept 13% (ε =
        0.05) and 29% (ε = 0.3) fewer weights than the plain search (benchmarks/nettrim_solver.py).
        Kept-fraction mode (`_trim_to_count`): the loose search's solution is cut to exactly
        round(kept_fraction × allowed entries) weights by |ũ| over ``polish`` rounds, the kept
        weights re-fit on their support after each cut, and certified at the discrepancy
        reached. ``LayerSolution.polish`` says what it gave.
    """

    maxiter: int = 300
    tol: float = 1e-4
    gap_tol: float = 0.05
    search_tol: float | None = None
    max_solves: int = 30
    lam_range: float = 1e-6
    presolve_samples: int | None = 2000
    refit: bool = False
    refit_maxiter: int = 2000
    refit_lam: float = 1e-6
    polish: int = 0
    polish_maxiter: int = 50

    def __post_init__(self):
        if self.maxiter < 1 or self.max_solves < 1 or self.refit_maxiter < 1 or \
                self.polish_maxiter < 1:
            raise ValueError("maxiter, max_solves, refit_maxiter and polish_maxiter must be >= 1.")
        if self.polish < 0:
            raise ValueError(f"polish is a number of rounds (>= 0), got {self.polish}.")
        if not (self.tol > 0 and self.gap_tol > 0 and 0 < self.lam_range < 1):
            raise ValueError("tol and gap_tol must be > 0 and lam_range in (0, 1).")


def solve_layer(x=None, y=None, *, epsilon: float | None = None,
                kept_fraction: float | None = None, relu: bool = True, v=None,
                fit_bias: bool = True, offset=None, support=None,
                gram: GramStats | None = None, form: str = "auto", init_kernel=None,
                init_bias=None, shard: bool = True, progress: bool = False,
                options: SolverOptions = SolverOptions()) -> LayerSolution:
    """Prunes one layer: the sparsest kernel whose outputs stay within ``epsilon`` of ``y``.

    Args:
      x: (P, N) layer inputs.
      y: (P, M) the trained layer's outputs: post-ReLU (``relu=True``) or the pre-activation
        (``relu=False``, the linear program: every entry is active).
      epsilon: relative discrepancy in (0, 1): ‖act(x·kernel + bias + offset) − y‖_F ≤
        epsilon·‖y‖_F.
      kept_fraction: instead of ``epsilon``, the fraction of (allowed) kernel entries to keep;
        met within ±0.005 and certified at the discrepancy it reaches.
      relu: ReLU program (True) or linear program (False).
      v: (P, M) inactive-set bound for the cascade scheme (default 0).
      fit_bias: solve for a bias; False for layers without one.
      offset: (M,) fixed term added to the pre-activation (e.g. a folded batch-norm shift).
      support: (N, M) bool, entries allowed to be nonzero (default all).
      gram: the linear program's `gram.GramStats` (sums over the calibration rows, accumulated
        in chunks), instead of ``x`` and ``y``: nothing of size P is held.
      form: the linear program in Gram form (``"gram"``: memory and cost independent of P, see
        `gram`), on its rows (``"rows"``), or ``"auto"``: Gram form when P > 2(N + 1). The
        certificate is measured on the real rows either way (``x``, ``y`` in chunks; from
        ``gram`` alone, by the sums over all rows in float64).
      init_kernel, init_bias: warm start for the first solve (e.g. the trained weights).
      shard: spread the neuron axis over all devices when there are several.
      progress: show a progress bar of the λ search (one tick per full-size solve).
      options: the search's and the refinements' `SolverOptions`.

    Returns:
      A `LayerSolution`. If epsilon (or the kept fraction) cannot be met a warning is issued; for
      epsilon the solution then has ``feasible=False`` and holds the lowest-discrepancy solve.
    """
    started = time.perf_counter()
    if (epsilon is None) == (kept_fraction is None):
        raise ValueError("Give exactly one of epsilon (relative discrepancy) and kept_fraction.")
    if epsilon is not None and not 0 < epsilon < 1:
        raise ValueError(f"epsilon is relative (‖error‖_F / ‖y‖_F) and must be in (0, 1), "
                         f"got {epsilon}.")
    if kept_fraction is not None and not 0 < kept_fraction <= 1:
        raise ValueError(f"kept_fraction must be in (0, 1], got {kept_fraction}.")
    if gram is None and (x is None or y is None):
        raise ValueError("Give the layer's rows x and y, or (linear program) gram=GramStats.")
    data = layer_data(x, y, v=v, relu=relu, fit_bias=fit_bias, offset=offset, support=support,
                      gram=gram, form=form)
    maxiter, tol, polish = options.maxiter, options.tol, options.polish
    search_tol = options.search_tol
    if search_tol is None:
        search_tol = 0.15 if polish else 0.03
    if epsilon is not None:
        def make_goal(d):
            return _Goal.discrepancy(epsilon, d.y_norm, search_tol)
    elif polish:
        def make_goal(d):
            return _Goal.kept_at_least(kept_fraction, search_tol)
    else:
        def make_goal(d):
            return _Goal.kept(kept_fraction)

    def solve(problem, lam, start):
        return solve_at_lambda(problem, lam, start, maxiter, tol)

    search = dict(solve=solve, max_solves=options.max_solves, lam_range=options.lam_range)
    # No total: the search stops when it brackets its goal, usually long before max_solves, so
    # a bar out of max_solves would show a false ETA. It counts solves and their rate.
    with tqdm(desc="Net-Trim λ search", unit="solve", leave=False,
              disable=not progress) as bar:
        found, problem, presolve_iterations = _multilevel_search(
            data, make_goal, options.presolve_samples, (init_kernel, init_bias), dict(shard=shard),
            search, bar)
    best, polish_report = found.best, None
    if polish and found.feasible is not None:
        refine = dict(rounds=polish, maxiter=options.polish_maxiter, tol=tol,
                      lam=options.refit_lam)
        if epsilon is not None:
            best, polish_report = _polish(problem, best, epsilon * data.y_norm, **refine)
        else:
            keep = round(kept_fraction * int(data.support.sum()))
            best, polish_report = _trim_to_count(problem, best, keep, **refine)
    y_norm = data.y_norm
    discrepancy = best.error / y_norm
    if epsilon is None:
        certified = discrepancy * (1 + 1e-3)
        if abs(best.kept_fraction - kept_fraction) > KEPT_FRACTION_TOLERANCE:
            warnings.warn(f"Net-Trim kept {best.kept_fraction:.4f} of this layer's weights, not "
                          f"{kept_fraction:g} ± {KEPT_FRACTION_TOLERANCE}; raise max_solves or "
                          "maxiter.", stacklevel=2)
    else:
        certified = epsilon
        if found.feasible is None:
            warnings.warn(f"Net-Trim could not meet epsilon={epsilon:g} for this layer: the best "
                          f"discrepancy reached is {discrepancy:.4g} (at λ={best.lam:.3g}, the "
                          "smallest tried). Raise epsilon, maxiter, or lower lam_range.",
                          stacklevel=2)
    kernel, bias = problem.split(best.u_real)
    if data.compressed:  # the certificate, on the real rows rather than the compressed ones
        discrepancy = _real_misfit(x, y, gram, kernel, bias, offset) / y_norm
        if epsilon is None:
            certified = discrepancy * (1 + 1e-3)
    kept, violation, refit_report = best.kept_fraction, best.violation, None
    if options.refit:
        again, refit_kernel, refit_bias = _refit(
            x, y, data.support & (kernel != 0), kernel, bias,
            dict(relu=relu, v=v, fit_bias=fit_bias, offset=offset, gram=gram, form=form),
            shard=shard, maxiter=options.refit_maxiter, tol=tol, lam=options.refit_lam)
        refit_report = {"discrepancy_before": discrepancy, "iterations": again.iterations,
                        "used": bool(again.error < best.error)}
        if refit_report["used"]:
            kernel, bias, violation = refit_kernel, refit_bias, again.violation
            discrepancy = again.error / y_norm
            if data.compressed:
                discrepancy = _real_misfit(x, y, gram, kernel, bias, offset) / y_norm
            kept = np.count_nonzero(kernel) / max(int(data.support.sum()), 1)
            if epsilon is None:
                certified = discrepancy * (1 + 1e-3)
    return LayerSolution(
        kernel=kernel, bias=bias, discrepancy=discrepancy, epsilon=certified,
        feasible=discrepancy <= certified, lam=best.lam,
        iterations=sum(r.iterations for r in found.solves) + (polish_report or {}).get(
            "iterations", 0), converged=best.gap <= options.gap_tol,
        duality_gap=best.gap,
        inactive_violation=violation / y_norm, kept_fraction=kept,
        solves=len(found.solves), seconds=time.perf_counter() - started,
        presolve_iterations=presolve_iterations, refit=refit_report, polish=polish_report,
        lam_path=tuple({"lam": float(r.lam), "discrepancy": float(r.error / y_norm),
                        "kept_fraction": float(r.kept_fraction)} for r in found.solves))


def _real_misfit(x, y, stats, kernel, bias, offset) -> float:
    """‖x·kernel + bias + offset − y‖_F on the real rows (in chunks), or from the statistics
    of all of them when only those were given."""
    if x is not None:
        return math.sqrt(gram_lib.row_misfit(x, y, kernel, bias, offset))
    return math.sqrt(float(stats.misfit(kernel, bias, offset).sum()))


def _polish(problem: NormalizedLayer, result: LambdaSolve, target_error: float, *, rounds: int,
            maxiter: int, tol: float, lam: float) -> tuple[LambdaSolve, dict]:
    """Debias, then threshold, ``rounds`` times, starting from a feasible λ-search solve.

    ℓ1 shrinks the weights it keeps, so the kept weights are re-fit on their support at a
    negligible ℓ1 weight (``lam`` × the λ that prunes everything; ``maxiter`` FISTA iterations,
    warm) — the discrepancy drops well below ε — and then the smallest weights (by |ũ|, their
    output contribution in the normalized problem, whose columns all have the same norm) are
    removed, as many as keep the measured error ≤ ``target_error`` (bisection on their count).
    Every candidate is measured on the real weights, so the result is feasible by construction.

    Returns the final solve's record (the ℓ1 solve's λ and duality gap) and
    ``{"kept_before", "discrepancy_before", "iterations", "removed"}``.
    """
    weights = problem.penalty_weights
    penalized = jnp.isfinite(weights) & (weights > 0)

    def error(u):
        return measure(problem.data, problem.to_real(u), problem.device_data)

    def without(u, threshold):
        return jnp.where(penalized & (jnp.abs(u) <= threshold), 0.0, u)

    u, (best_error, violation) = result.u, (result.error, result.violation)
    iterations, removed = 0, []
    for _ in range(rounds):
        refit, refit_error, count = _refit_on_support(problem, u, maxiter=maxiter, tol=tol,
                                                      lam=lam)
        iterations += count
        if refit_error[0] < best_error:
            u, (best_error, violation) = refit, refit_error
        u_host = np.asarray(u)
        scores = np.sort(np.abs(u_host)[np.asarray(penalized) & (u_host != 0)])
        feasible, infeasible = 0, len(scores) + 1  # counts of removed weights
        while infeasible - feasible > 1:
            count = (feasible + infeasible) // 2
            candidate_error = error(without(u, scores[count - 1]))
            if candidate_error[0] <= target_error:
                feasible, feasible_error = count, candidate_error
            else:
                infeasible = count
        removed.append(feasible)
        if not feasible:
            break
        u, (best_error, violation) = without(u, scores[feasible - 1]), feasible_error
    return _polished(problem, result, u, best_error, violation, iterations, removed)


def _refit_on_support(problem: NormalizedLayer, u, *, maxiter: int, tol: float, lam: float):
    """The nonzeros of the normalized weights ``u`` re-fit at ``lam`` × λ_max (the others held
    at 0; ``maxiter`` warm FISTA iterations). Returns the weights, their measured (error,
    violation) and the iterations spent."""
    weights = problem.penalty_weights
    on_support = jnp.where(weights == 0, 0.0,
                           jnp.where(u != 0, lam * problem.lam_max * weights, jnp.inf))
    refit, counts, _ = solve_at(problem.design_n, problem.y_d, problem.v_d, problem.active_d, u,
                                on_support, maxiter, problem.abs_tol * tol)
    return (refit, measure(problem.data, problem.to_real(refit), problem.device_data),
            int(np.max(counts)))


def _polished(problem: NormalizedLayer, result: LambdaSolve, u, error: float, violation: float,
              iterations: int, removed: list) -> tuple[LambdaSolve, dict]:
    """The record of a polished solve (``result``'s λ and duality gap) and the polish report."""
    u_real = problem.to_real(u)
    polished = result._replace(u=u, u_real=u_real, error=error, violation=violation,
                               kept_fraction=problem.kept_fraction(u_real))
    return polished, {"kept_before": result.kept_fraction,
                      "discrepancy_before": result.error / problem.y_norm,
                      "iterations": iterations, "removed": removed}


def _trim_to_count(problem: NormalizedLayer, result: LambdaSolve, keep: int, *, rounds: int,
                   maxiter: int, tol: float, lam: float) -> tuple[LambdaSolve, dict]:
    """Cuts a λ-search solve that keeps at least ``keep`` weights to ``keep`` (fewer only
    where a re-fit itself lands on a zero).

    Each of ``rounds`` rounds removes an equal share (geometrically) of what is left above
    ``keep`` — the smallest |ũ|, as `_polish` ranks them — and re-fits the kept weights on their
    support at a negligible ℓ1 weight (``lam`` × λ_max, ``maxiter`` warm FISTA iterations; kept
    only if it lowers the measured discrepancy). Cutting in rounds lets each re-fit move weight
    onto the survivors before the next cut. The discrepancy is measured on the real weights.

    Returns the final record and ``{"kept_before", "discrepancy_before", "iterations",
    "removed"}``.
    """
    weights = problem.penalty_weights
    penalized = np.asarray(jnp.isfinite(weights) & (weights > 0))
    u, (best_error, violation) = result.u, (result.error, result.violation)
    start = int(np.count_nonzero(np.asarray(u)[penalized]))
    iterations, removed = 0, []
    for index in range(1, rounds + 1):
        u_host = np.asarray(u)
        current = int(np.count_nonzero(u_host[penalized]))
        target = max(keep, round(start * (keep / max(start, 1)) ** (index / rounds)))
        removed.append(max(current - target, 0))
        if removed[-1]:
            candidates = np.flatnonzero(penalized & (u_host != 0))
            order = np.argsort(np.abs(u_host.flat[candidates]), kind="stable")
            cut = np.zeros(u_host.shape, bool)
            cut.flat[candidates[order[:removed[-1]]]] = True
            u = jnp.where(cut, 0.0, u)  # on device, keeping u's sharding
        best_error, violation = measure(problem.data, problem.to_real(u), problem.device_data)
        refit, refit_error, count = _refit_on_support(problem, u, maxiter=maxiter, tol=tol,
                                                      lam=lam)
        iterations += count
        if refit_error[0] < best_error:
            u, (best_error, violation) = refit, refit_error
    return _polished(problem, result, u, best_error, violation, iterations, removed)


def _refit(x, y, pattern, kernel, bias, common: dict, *, shard: bool, maxiter: int, tol: float,
           lam: float):
    """Net-Trim's problem restricted to ``pattern`` at ``lam`` × λ_max, warm-started from
    ``kernel``/``bias``: a (constrained) least-squares re-fit of the weights on that support.
    Returns the solve's record and its kernel and bias."""
    data = layer_data(x, y, support=pattern, **common)
    problem = NormalizedLayer(data, shard=shard, init_kernel=np.where(pattern, kernel, 0),
                              init_bias=bias if common.get("fit_bias", True) else None)
    again = solve_at_lambda(problem, lam * problem.lam_max, problem.start, maxiter, tol)
    refit_kernel, refit_bias = problem.split(again.u_real)
    if data.compressed:
        again = again._replace(error=_real_misfit(x, y, common.get("gram"), refit_kernel,
                                                  refit_bias, common.get("offset")))
    return again, refit_kernel, refit_bias


def solve_layer_nm(x, y, *, nm: tuple[int, int], trained_kernel=None, trained_bias=None,
                   support=None, kept_fraction=None, relu: bool = True, v=None,
                   fit_bias: bool = True, offset=None, gram: GramStats | None = None,
                   form: str = "auto", shard: bool = True,
                   options: SolverOptions = SolverOptions()) -> LayerSolution:
    """Net-Trim with an N:M pattern: every M consecutive inputs of an output unit keep at most N
    weights (the 2:4 pattern sparse tensor cores run).

    Net-Trim at kept fraction N/M (within ``support``) says which weights matter; each group
    keeps its N largest |weights| of that solution (ties broken by the trained weights); then
    the weights on that pattern are re-fit under Net-Trim's constraints (active outputs matched,
    inactive ones held ≤ v) at a negligible ℓ1 weight (``options.refit_lam`` × the λ that prunes
    everything), which removes the ℓ1 shrinkage of the first solve instead of only masking it.
    Certified at the discrepancy it reaches, like the kept-fraction mode.

    Args:
      nm: (N, M); the layer's input count must be a multiple of M.
      trained_kernel: (N_in, M_out) the trained weights (tie-breaks among zeros of the first
        solve); `network.prune_network` passes it.
      trained_bias, kept_fraction: ignored (prune_network passes them; the pattern fixes the
        kept fraction).
      relu, v, fit_bias, offset, gram, form, shard: as in `solve_layer`.
      options: the first solve's search (``refit`` and ``polish`` are not used: the pattern's
        re-fit replaces them) and the re-fit's ``refit_maxiter`` FISTA iterations (a
        least-squares-like problem converges slower than a strongly regularized one).
    """
    n, m = nm
    num_inputs, num_outputs = (gram.num_inputs, gram.num_outputs) if gram is not None else (
        np.shape(x)[1], np.shape(y)[1])
    check_nm(nm, num_inputs)
    started = time.perf_counter()
    allowed = np.ones((num_inputs, num_outputs), bool) if support is None \
        else np.asarray(support, bool)
    common = dict(relu=relu, v=v, fit_bias=fit_bias, offset=offset, gram=gram, form=form)
    first = solve_layer(x, y, kept_fraction=n / m, support=allowed, shard=shard, **common,
                        options=dataclasses.replace(options, refit=False, polish=0))
    scores = np.abs(first.kernel) + 1e-9 * (0 if trained_kernel is None
                                            else np.abs(np.asarray(trained_kernel)))
    pattern = nm_mask(np.where(allowed, scores, -np.inf), n, m) & allowed
    best, kernel, bias = _refit(x, y, pattern, first.kernel, first.bias, common, shard=shard,
                                maxiter=options.refit_maxiter, tol=options.tol,
                                lam=options.refit_lam)
    y_norm = math.sqrt(float(gram.y_squares.sum())) if gram is not None else float(
        np.linalg.norm(np.asarray(y, np.float32)))
    discrepancy = best.error / y_norm
    return LayerSolution(
        kernel=kernel, bias=bias, discrepancy=discrepancy, epsilon=discrepancy * (1 + 1e-3),
        feasible=True, lam=best.lam, iterations=first.iterations + best.iterations,
        converged=best.gap <= options.gap_tol, duality_gap=best.gap,
        inactive_violation=best.violation / y_norm,
        kept_fraction=float(np.count_nonzero(kernel) / allowed.sum()), solves=first.solves + 1,
        seconds=time.perf_counter() - started, presolve_iterations=first.presolve_iterations,
        lam_path=first.lam_path + ({"lam": best.lam, "discrepancy": discrepancy,
                                    "kept_fraction": best.kept_fraction},))


solve_layer_nm.uses_trained_weights = True
