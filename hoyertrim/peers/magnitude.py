"""Magnitude pruning: keep the largest |w| of the layer (N:M: of each group of M inputs)."""

from __future__ import annotations

import numpy as np

from hoyertrim.masks import nm_mask
from hoyertrim.peers.layer import allowed_entries, one_shot, top_k

__all__ = ["magnitude_layer", "magnitude_mask"]


def magnitude_mask(kernel, *, kept_fraction=None, nm=None, support=None) -> np.ndarray:
    """bool (N, M): the largest |w| of the layer (``kept_fraction`` of the allowed entries) or
    of each N:M group."""
    kernel = np.asarray(kernel)
    allowed = allowed_entries(support, kernel)
    scores = np.where(allowed, np.abs(kernel), -np.inf)
    if nm is not None:
        return nm_mask(scores, *nm) & allowed
    return top_k(scores, int(round(kept_fraction * allowed.sum())))


magnitude_layer = one_shot(
    "magnitude", lambda x, kernel, **kw: np.where(magnitude_mask(kernel, **kw), kernel, 0),
    "magnitude: the largest |w| of each layer")
