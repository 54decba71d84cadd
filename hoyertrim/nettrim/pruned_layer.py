"""`PrunedLayer`: what `prune_network` did to one linear map, and what was measured of it."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

__all__ = ["PrunedLayer", "certified_epsilon"]


@dataclasses.dataclass
class PrunedLayer:
    """One linear map's record in a `PrunedNetwork` (``network.layers[name]``).

    Relative discrepancies are ‖q̂ − q‖_F / ‖q‖_F of the layer's certified quantity q: the
    post-activation relu(z) for the ReLU program, the pre-activation z for the linear one.

    Attributes:
      program: ``"relu"`` or ``"linear"``: what the certificate bounds.
      reason: why that program (what follows the map in the computation).
      bounds: the certified inequality, in words.
      mode: ``"epsilon"`` (the layer had to meet ``epsilon_requested``) or ``"kept_fraction"``
        (it kept a fraction and is certified at the discrepancy it reached).
      epsilon_requested: the ε the layer was asked to meet (the caller's, or in the cascade the
        √γ rule's); None in kept-fraction mode.
      epsilon_certified: the bound this report states for the returned weights.
      discrepancy: what the solver measured on its rows (its Gram sums or row subset).
      measured: the same recomputed by running the original and the pruned model on the
        calibration rows; never above ``epsilon_certified`` (else `CertificateError`).
      heldout_measured: the same on the held-out inputs (None without them).
      feasible: ``discrepancy ≤ epsilon_certified``.
      activation, lipschitz: the activation after the map and its Lipschitz constant, when known;
        ``output_bound`` = lipschitz · ε certified, the bound implied on the activation's output.
      weights, kept_weights, kept_fraction: the map's weights (within its support), how many are
        nonzero, and their ratio.
      samples: calibration rows the layer was solved on.
      fallback: why the trained weights were kept (a solve that missed ε; nothing to prune), or
        None.
      lam, iterations, converged, duality_gap, solves, seconds, presolve_iterations,
        inactive_violation, lam_path, refit, polish: the solve (`problem.LayerSolution`).
    """

    program: str
    reason: str
    bounds: str
    mode: str
    epsilon_requested: float | None
    epsilon_certified: float
    discrepancy: float
    feasible: bool
    weights: int
    kept_weights: int
    kept_fraction: float
    samples: int
    fallback: str | None = None
    measured: float | None = None
    heldout_measured: float | None = None
    activation: str | None = None
    lipschitz: float | None = None
    output_bound: float | None = None
    lam: float | None = None
    iterations: int = 0
    converged: bool = True
    duality_gap: float | None = None
    solves: int = 0
    seconds: float = 0.0
    presolve_iterations: int = 0
    inactive_violation: float = 0.0
    lam_path: tuple = ()
    refit: dict | None = None
    polish: dict | None = None

    def as_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values (what stage summaries and `save_pruned` write)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PrunedLayer:
        """Reads back what `as_dict` wrote; unknown keys are an error (a file of another
        version says so instead of losing fields)."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"Not a PrunedLayer record (written by another version of "
                             f"hoyertrim?): unknown fields {', '.join(unknown)}.")
        record = cls(**values)
        record.lam_path = tuple(record.lam_path)
        return record


def certified_epsilon(record: Mapping[str, Any]) -> float:
    """The certified ε of a layer record as written to JSON (`PrunedLayer.as_dict`); records
    written before 2026-12-06 call it ``epsilon``."""
    return record["epsilon_certified"] if "epsilon_certified" in record else record["epsilon"]
