"""What the one-shot peers share: the pattern checks, the inputs' Gram matrix, the one tie rule,
and the adapter that runs a mask or kernel rule as a `nettrim.pruner.LayerPruner`."""

from __future__ import annotations

import math
import time
from typing import Callable

import jax.numpy as jnp
import numpy as np

from hoyertrim.masks import check_nm, top_k_mask
from hoyertrim.nettrim.gram import GramStats
from hoyertrim.nettrim.problem import LayerSolution
from hoyertrim.nettrim.pruner import LayerPruner

__all__ = ["allowed_entries", "check_pattern", "inputs_gram", "one_shot", "top_k"]


def check_pattern(num_inputs: int, kernel, kept_fraction, nm) -> None:
    """Raises ValueError unless exactly one of ``kept_fraction`` in (0, 1] and an N:M pattern
    that fits the kernel's (N, M) rows is given, and ``x`` has the kernel's input count."""
    if (kept_fraction is None) == (nm is None):
        raise ValueError("Give exactly one of kept_fraction and nm=(N, M).")
    if kept_fraction is not None and not 0 < kept_fraction <= 1:
        raise ValueError(f"kept_fraction must be in (0, 1], got {kept_fraction}.")
    if nm is not None:
        check_nm(nm, kernel.shape[0])
    if num_inputs != kernel.shape[0]:
        raise ValueError(f"x has {num_inputs} inputs, the kernel {kernel.shape[0]}.")


def top_k(scores: np.ndarray, keep: int) -> np.ndarray:
    """`masks.top_k_mask` (the library's one tie rule: ties to the lower flat index), as NumPy."""
    return np.asarray(top_k_mask(jnp.asarray(scores), keep))


def allowed_entries(support, kernel) -> np.ndarray:
    """bool (N, M): the entries a rule may keep (``support``, or every entry)."""
    return np.ones(np.shape(kernel), bool) if support is None else np.asarray(support, bool)


def inputs_gram(x) -> np.ndarray:
    """XᵀX (N, N) in float64 of inputs ``x`` (P, N), or of a `GramStats` (its sums)."""
    if isinstance(x, GramStats):
        return x.gram[:-1, :-1].copy()
    x = np.asarray(x, np.float64)
    return x.T @ x


def _measured(x, y, gram, kernel, bias, relu, offset, started) -> LayerSolution:
    shift = (0.0 if bias is None else bias) + (0.0 if offset is None else offset)
    if gram is not None:  # the linear program's misfit from the sums (float64)
        misfit = float(gram.misfit(kernel, np.broadcast_to(shift, kernel.shape[1])).sum())
        discrepancy = math.sqrt(misfit / float(gram.y_squares.sum()))
    else:
        z = np.asarray(x, np.float64) @ kernel + shift
        out = np.maximum(z, 0) if relu else z
        y = np.asarray(y, np.float64)
        discrepancy = float(np.linalg.norm(out - y) / np.linalg.norm(y))
    return LayerSolution(
        kernel=kernel.astype(np.float32),
        bias=np.zeros(kernel.shape[1], np.float32) if bias is None else
        np.asarray(bias, np.float32),
        discrepancy=discrepancy, epsilon=discrepancy * (1 + 1e-3), feasible=True, lam=0.0,
        iterations=0, converged=True, inactive_violation=0.0,
        kept_fraction=float(np.mean(kernel != 0)), solves=1,
        seconds=time.perf_counter() - started)


def one_shot(name: str, prune: Callable[..., np.ndarray], description: str) -> LayerPruner:
    """A one-shot `LayerPruner` from ``prune(data, kernel, *, kept_fraction, nm, support) ->
    pruned kernel (N, M)``, where ``data`` is the inputs ``x`` (P, N) or their `GramStats`.

    It takes what Net-Trim's solvers take plus the trained kernel and bias, keeps the bias, and
    measures the layer's discrepancy like Net-Trim (‖relu(ẑ) − y‖_F / ‖y‖_F for the ReLU
    program, ‖ẑ − y‖_F / ‖y‖_F for the linear one); that discrepancy is its certificate: a
    one-shot method fixes a sparsity, not an error."""

    def solve(x=None, y=None, *, trained_kernel, trained_bias=None, kept_fraction=None,
              nm=None, relu=True, v=None, fit_bias=True, offset=None, support=None,
              gram: GramStats | None = None, **unused) -> LayerSolution:
        started = time.perf_counter()
        if (gram is None) == (x is None):
            raise ValueError("Give the layer's inputs x (and outputs y) or their gram sums.")
        if gram is not None and relu:
            raise ValueError("The Gram sums describe the linear program only; the ReLU program "
                             "needs the rows x, y.")
        kernel = np.asarray(trained_kernel, np.float64)
        data = gram if gram is not None else np.asarray(x)
        check_pattern(gram.num_inputs if gram is not None else np.shape(x)[1], kernel,
                      kept_fraction if nm is None else None, nm)
        new = prune(data, kernel, kept_fraction=None if nm else kept_fraction, nm=nm,
                    support=support)
        bias = None if trained_bias is None or not fit_bias else np.asarray(trained_bias)
        return _measured(x, y, gram, new, bias, relu, None if bias is not None else offset,
                         started)

    solve.__name__ = f"{name}_layer"
    solve.__doc__ = (f"{description}, as a layer solver: ``kept_fraction`` or ``nm=(N, M)``; "
                     "inputs ``x``, ``y`` or, for the linear program, their ``gram`` sums; the "
                     "trained ``trained_kernel`` (N, M) and ``trained_bias``; the bias is kept.")
    return LayerPruner(name=name, solve=solve, one_shot=True, trained_weights=True,
                       takes_gram=True, description=description)
