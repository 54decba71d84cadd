"""One-shot layer-wise peers of Net-Trim, behind its solver interface: magnitude, Wanda and
SparseGPT, at a kept fraction per layer or as N:M patterns.

Each ``*_layer`` function takes what `solve_layer` takes (inputs ``x`` (P, N), the layer's
trained output ``y`` (P, M) — post-ReLU for the ReLU program, the pre-activation for the linear
one — or, for the linear program, their Gram sums ``gram`` (`gram.GramStats`: SparseGPT's
H = XᵀX and Wanda's ‖X_:,i‖₂ are read off them), and the options `network.prune_network`
passes) plus the trained kernel and bias, and
returns a `LayerSolution` whose ``discrepancy`` is measured like Net-Trim's (the layer's
certified quantity: ‖relu(ẑ) − y‖_F / ‖y‖_F or ‖ẑ − y‖_F / ‖y‖_F) and whose ``epsilon`` is that
discrepancy: a one-shot method fixes a sparsity, not an error. So
``prune_network(model, variables, images, kept_fraction=0.1, solver=peers.sparsegpt_layer)``
prunes any Flax model with SparseGPT, in the parallel scheme or the cascade (SparseGPT's own
sequential mode: each layer sees the pruned layers' outputs), with the same checked report.

- **Magnitude**: keeps the largest |w| of the layer (N:M: of each group).
- **Wanda** (Sun, Liu, Bair & Kolter, ICLR 2024): score |w_ij|·‖X_:,i‖₂; every output unit keeps
  the same fraction of its inputs (N:M: the N best of each M consecutive inputs); no update.
- **SparseGPT** (Frantar & Alistarh, ICML 2023): minimizes ‖XW − XŴ‖²_F at the given sparsity
  with H = XᵀX + δI (δ = ``damping`` × mean diag H). Walking the inputs in blocks of
  ``block_size``, the mask of a block is chosen by the OBS saliency w²/[H⁻¹]²_ii (N:M: every M
  inputs), and each pruned weight's error w_i/U_ii is propagated to the later inputs through
  row i of U, the upper Cholesky factor of H⁻¹ (for the first weight this is exactly the
  Optimal-Brain-Surgeon update). The bias is kept.
"""

from __future__ import annotations

import math
import time

import jax.numpy as jnp
import numpy as np

from hoyertrim.masks import top_k_mask
from hoyertrim.nettrim.gram import GramStats
from hoyertrim.nettrim.problem import LayerSolution


def _check(num_inputs: int, kernel, kept_fraction, nm):
    if (kept_fraction is None) == (nm is None):
        raise ValueError("Give exactly one of kept_fraction and nm=(N, M).")
    if kept_fraction is not None and not 0 < kept_fraction <= 1:
        raise ValueError(f"kept_fraction must be in (0, 1], got {kept_fraction}.")
    if nm is not None:
        n, m = nm
        if not 0 < n <= m:
            raise ValueError(f"N:M needs 0 < N ≤ M, got {n}:{m}.")
        if kernel.shape[0] % m:
            raise ValueError(f"N:M groups M consecutive inputs; this layer has {kernel.shape[0]}"
                             f" inputs, not a multiple of M = {m}.")
    if num_inputs != kernel.shape[0]:
        raise ValueError(f"x has {num_inputs} inputs, the kernel {kernel.shape[0]}.")


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keeps the ``n`` highest ``scores`` of every ``m`` consecutive rows, per column.

    Args:
      scores: (N, M_out), N a multiple of ``m``.

    Returns:
      bool (N, M_out) with exactly ``n`` True in each group (ties to the lower row).
    """
    rows, cols = scores.shape
    groups = scores.reshape(rows // m, m, cols)
    order = np.argsort(-groups, axis=1, kind="stable")
    mask = np.zeros_like(groups, bool)
    np.put_along_axis(mask, order[:, :n], True, axis=1)
    return mask.reshape(rows, cols)


def _top_k(scores: np.ndarray, keep: int) -> np.ndarray:
    """`masks.top_k_mask` (the library's one tie rule: ties to the lower flat index), as NumPy."""
    return np.asarray(top_k_mask(jnp.asarray(scores), keep))


def _allowed(support, kernel):
    return np.ones(kernel.shape, bool) if support is None else np.asarray(support, bool)


def magnitude_mask(kernel, *, kept_fraction=None, nm=None, support=None) -> np.ndarray:
    """The largest |w| of the layer (``kept_fraction`` of the allowed entries) or of each N:M
    group."""
    kernel = np.asarray(kernel)
    allowed = _allowed(support, kernel)
    scores = np.where(allowed, np.abs(kernel), -np.inf)
    if nm is not None:
        return nm_mask(scores, *nm) & allowed
    return _top_k(scores, int(round(kept_fraction * allowed.sum())))


def _inputs_gram(x) -> np.ndarray:
    """XᵀX (N, N) in float64 of inputs ``x`` (P, N), or of a `GramStats` (its sums)."""
    if isinstance(x, GramStats):
        return x.gram[:-1, :-1].copy()
    x = np.asarray(x, np.float64)
    return x.T @ x


def wanda_mask(x, kernel, *, kept_fraction=None, nm=None, support=None) -> np.ndarray:
    """Wanda's mask: score |w_ij|·‖x_:,i‖₂; each output unit keeps ``kept_fraction`` of its
    allowed inputs (or the N best of every M consecutive inputs). ``x``: (P, N) inputs or
    their `GramStats`."""
    kernel = np.asarray(kernel)
    allowed = _allowed(support, kernel)
    norms = np.sqrt(np.maximum(np.diag(_inputs_gram(x)), 0.0))
    scores = np.where(allowed, np.abs(kernel) * norms[:, None], -np.inf)
    if nm is not None:
        return nm_mask(scores, *nm) & allowed
    mask = np.zeros(kernel.shape, bool)
    for j in range(kernel.shape[1]):
        keep = int(round(kept_fraction * allowed[:, j].sum()))
        mask[:, j] = _top_k(scores[:, j], keep)
    return mask


def sparsegpt_kernel(x, kernel, *, kept_fraction=None, nm=None, support=None,
                     block_size: int = 128, damping: float = 0.01) -> np.ndarray:
    """SparseGPT's pruned kernel (N, M) for inputs ``x`` (P, N) or their `GramStats`; see the
    module docstring.

    Inputs that are zero on every sample are pruned (their weights do nothing on the data), as
    in the reference implementation. Float64 throughout.
    """
    weights = np.array(kernel, np.float64).T  # (M, N): rows are output units, as in the paper
    allowed = _allowed(support, kernel).T
    hessian = _inputs_gram(x)
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    weights[:, dead] = 0.0
    hessian[np.diag_indices_from(hessian)] += damping * np.mean(np.diag(hessian))
    # Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU).
    upper = np.linalg.cholesky(np.linalg.inv(hessian)).T
    num_inputs = weights.shape[1]
    pruned_so_far = 0
    for start in range(0, num_inputs, block_size):
        stop = min(start + block_size, num_inputs)
        block = weights[:, start:stop].copy()
        factor = upper[start:stop, start:stop]
        diag = np.diag(factor)
        pruned = np.zeros_like(block, bool)
        if kept_fraction is not None:
            saliency = np.where(allowed[:, start:stop], block ** 2 / diag ** 2, np.inf)
            # Blocks share the layer's pruned count by their allowed entries, rounded so the
            # layer's total is exact.
            count = int(round((1 - kept_fraction) * allowed[:, :stop].sum())) - pruned_so_far
            pruned_so_far += count
            pruned.reshape(-1)[np.argsort(saliency.reshape(-1), kind="stable")[:count]] = True
            pruned |= ~allowed[:, start:stop]
        errors = np.zeros_like(block)
        for i in range(stop - start):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                saliency = np.where(allowed[:, start:stop][:, group],
                                    block[:, group] ** 2 / diag[group] ** 2, np.inf)
                order = np.argsort(saliency, axis=1, kind="stable")
                np.put_along_axis(pruned[:, group], order[:, :nm[1] - nm[0]], True, axis=1)
                pruned[:, group] |= ~allowed[:, start:stop][:, group]
            column = block[:, i]
            kept = np.where(pruned[:, i], 0.0, column)
            error = (column - kept) / factor[i, i]
            block[:, i:] -= np.outer(error, factor[i, i:])
            block[:, i] = kept
            errors[:, i] = error
        weights[:, start:stop] = block
        weights[:, stop:] -= errors @ upper[start:stop, stop:]
    return weights.T


def _solution(x, y, gram, kernel, bias, relu, offset, started) -> LayerSolution:
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


def _peer(name, prune):
    def layer(x=None, y=None, *, trained_kernel, trained_bias=None, kept_fraction=None,
              nm=None, relu=True, v=None, fit_bias=True, offset=None, support=None,
              gram: GramStats | None = None, **unused):
        started = time.perf_counter()
        if (gram is None) == (x is None):
            raise ValueError("Give the layer's inputs x (and outputs y) or their gram sums.")
        if gram is not None and relu:
            raise ValueError("The Gram sums describe the linear program only; the ReLU program "
                             "needs the rows x, y.")
        kernel = np.asarray(trained_kernel, np.float64)
        data = gram if gram is not None else np.asarray(x)
        _check(gram.num_inputs if gram is not None else np.shape(x)[1], kernel,
               kept_fraction if nm is None else None, nm)
        new = prune(data, kernel, kept_fraction=None if nm else kept_fraction, nm=nm,
                    support=support)
        bias = None if trained_bias is None or not fit_bias else np.asarray(trained_bias)
        return _solution(x, y, gram, new, bias, relu, None if bias is not None else offset,
                         started)

    layer.uses_trained_weights = True
    layer.__name__ = f"{name}_layer"
    layer.__doc__ = (f"{name} as a `prune_network` solver: ``kept_fraction`` or ``nm=(N, M)`` "
                     "(then pass kept_fraction=N/M to prune_network); inputs ``x``, ``y`` or, "
                     "for the linear program, their ``gram`` sums; the bias is kept.")
    return layer


magnitude_layer = _peer("magnitude", lambda x, k, **kw: np.where(magnitude_mask(k, **kw), k, 0))
wanda_layer = _peer("wanda", lambda x, k, **kw: np.where(wanda_mask(x, k, **kw), k, 0))
sparsegpt_layer = _peer("sparsegpt", sparsegpt_kernel)
