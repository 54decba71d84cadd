"""One-shot layer-wise peers of Net-Trim, behind the same `LayerPruner` interface: magnitude,
Wanda and SparseGPT, at a kept fraction per layer or as N:M patterns.

Each ``*_layer`` is a `hoyertrim.nettrim.pruner.LayerPruner` that takes what Net-Trim's solvers
take — inputs ``x`` (P, N) and the layer's trained output ``y`` (P, M) (post-ReLU for the ReLU
program, the pre-activation for the linear one) or, for the linear program, their Gram sums
(SparseGPT's H = XᵀX and Wanda's ‖X_:,i‖₂ are read off them) — plus the trained kernel and
bias, and returns a `LayerSolution` whose ``discrepancy`` is measured like Net-Trim's and whose
``epsilon`` is that discrepancy: a one-shot method fixes a sparsity, not an error. So
``prune_network(model, variables, images, kept_fraction=0.1, solver=peers.sparsegpt_layer)``
prunes any Flax model with SparseGPT, in the parallel scheme or the cascade (SparseGPT's own
sequential mode: each layer sees the pruned layers' outputs), with the same checked report.

  layer      the shared checks and the adapter from a mask/kernel rule to a `LayerPruner`
  magnitude  the largest |w|
  wanda      |w|·‖x‖ per output unit (Sun et al., ICLR 2024)
  sparsegpt  OBS updates block by block (Frantar & Alistarh, ICML 2023)
"""

from hoyertrim.peers.magnitude import magnitude_layer, magnitude_mask
from hoyertrim.peers.sparsegpt import sparsegpt_kernel, sparsegpt_layer
from hoyertrim.peers.wanda import wanda_layer, wanda_mask

__all__ = ["magnitude_layer", "magnitude_mask", "sparsegpt_kernel", "sparsegpt_layer",
           "wanda_layer", "wanda_mask"]
