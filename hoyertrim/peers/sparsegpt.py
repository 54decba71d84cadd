"""SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot", ICML 2023): minimizes ‖XW − XŴ‖²_F at the given sparsity with H = XᵀX + δI
(δ = ``damping`` × mean diag H). Walking the inputs in blocks of ``block_size``, the mask of a
block is chosen by the OBS saliency w²/[H⁻¹]²_ii (N:M: every M inputs), and each pruned weight's
error w_i/U_ii is propagated to the later inputs through row i of U, the upper Cholesky factor of
H⁻¹ (for the first weight this is exactly the Optimal-Brain-Surgeon update). The bias is kept.
"""

from __future__ import annotations

import numpy as np

from hoyertrim.peers.layer import allowed_entries, inputs_gram, one_shot

__all__ = ["sparsegpt_kernel", "sparsegpt_layer"]


def sparsegpt_kernel(x, kernel, *, kept_fraction=None, nm=None, support=None,
                     block_size: int = 128, damping: float = 0.01) -> np.ndarray:
    """SparseGPT's pruned kernel (N, M) for inputs ``x`` (P, N) or their `GramStats`; see the
    module docstring.

    Inputs that are zero on every sample are pruned (their weights do nothing on the data), as
    in the reference implementation. Float64 throughout.
    """
    weights = np.array(kernel, np.float64).T  # (M, N): rows are output units, as in the paper
    allowed = allowed_entries(support, kernel).T
    hessian = inputs_gram(x)
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


sparsegpt_layer = one_shot("sparsegpt", sparsegpt_kernel,
                           "SparseGPT: OBS updates of the kept weights, block by block")
