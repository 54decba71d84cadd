"""Pruning masks: boolean pytrees shaped like params (True = weight kept).

  rules     which weights to keep: thresholds, magnitude, counts, groups / units, N:M
  schedule  how the sparsity grows during gradual pruning
  report    what a mask leaves: kept fraction, alive units, FLOPs (`sparsity_report`)
"""

from hoyertrim.masks.report import LayerReport, SparsityReport, sparsity_report
from hoyertrim.masks.rules import LeafFilter, apply_masks, check_nm, count_masks, \
    coupled_group_masks, full_masks, \
    group_masks, input_unit_masks, kernel_nonzero_masks, magnitude_masks, nm_mask, \
    nonzero_masks, std_threshold_masks, threshold_masks, top_k_mask
from hoyertrim.masks.schedule import polynomial_sparsity

__all__ = ["LayerReport", "LeafFilter", "SparsityReport", "apply_masks", "check_nm",
           "count_masks", "coupled_group_masks", "full_masks", "group_masks", "input_unit_masks", "kernel_nonzero_masks",
           "magnitude_masks", "nm_mask", "nonzero_masks", "polynomial_sparsity",
           "sparsity_report", "std_threshold_masks", "threshold_masks", "top_k_mask"]
