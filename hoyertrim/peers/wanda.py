"""Wanda (Sun, Liu, Bair & Kolter, "A Simple and Effective Pruning Approach for Large Language
Models", ICLR 2024): score |w_ij|·‖X_:,i‖₂; every output unit keeps the same fraction of its
inputs (N:M: the N best of each M consecutive inputs); no weight update."""

from __future__ import annotations

import numpy as np

from hoyertrim.masks import nm_mask
from hoyertrim.peers.layer import allowed_entries, inputs_gram, one_shot, top_k

__all__ = ["wanda_layer", "wanda_mask"]


def wanda_mask(x, kernel, *, kept_fraction=None, nm=None, support=None) -> np.ndarray:
    """bool (N, M): Wanda's mask; each output unit keeps ``kept_fraction`` of its allowed inputs
    (or the N best of every M consecutive inputs). ``x``: (P, N) inputs or their `GramStats`."""
    kernel = np.asarray(kernel)
    allowed = allowed_entries(support, kernel)
    norms = np.sqrt(np.maximum(np.diag(inputs_gram(x)), 0.0))
    scores = np.where(allowed, np.abs(kernel) * norms[:, None], -np.inf)
    if nm is not None:
        return nm_mask(scores, *nm) & allowed
    mask = np.zeros(kernel.shape, bool)
    for j in range(kernel.shape[1]):
        keep = int(round(kept_fraction * allowed[:, j].sum()))
        mask[:, j] = top_k(scores[:, j], keep)
    return mask


wanda_layer = one_shot(
    "wanda", lambda x, kernel, **kw: np.where(wanda_mask(x, kernel, **kw), kernel, 0),
    "Wanda: |w|·‖x‖ per output unit, no update")
