"""The layer-pruner interface: one linear map's solver, and what `prune_network` may pass it.

Net-Trim's programs (`search.solve_layer`, `units.solve_layer_units`, `search.solve_layer_nm`,
`admm.solve_layer_admm`) and the one-shot peers (`hoyertrim.peers`) all take a layer's
calibration signals — inputs ``x`` (P, N) and trained outputs ``y`` (P, M), or for the linear
program their Gram sums — and return a `problem.LayerSolution`. A `LayerPruner` names such a
solver and says what else it takes, so that `network.prune_network` never has to recognise a
solver by its identity. `hoyertrim.pruners` registers the library's pruners by name.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

from hoyertrim.nettrim.problem import LayerSolution

__all__ = ["LayerPruner", "as_pruner"]

# What `prune_network` may pass beyond the signals and the target, when the solver takes it.
OPTIONS = ("shard", "progress")


@dataclasses.dataclass(frozen=True)
class LayerPruner:
    """A method that prunes one linear map from its calibration signals.

    ``solve(x, y, *, relu, v, fit_bias, offset, support, gram, epsilon | kept_fraction, …)``
    returns a `LayerSolution` whose ``discrepancy`` is measured and whose ``epsilon`` is the
    certificate (a solver that fixes a sparsity certifies the discrepancy it reaches).

    Attributes:
      name: the name the registry, the pipeline and the command line know it by.
      solve: the solver function.
      one_shot: fixes a sparsity rather than an error: runs with ``kept_fraction`` (or an N:M
        pattern) only, in one pass (magnitude, Wanda, SparseGPT).
      trained_weights: reads the trained layer: `prune_network` passes ``trained_kernel`` (N, M)
        and ``trained_bias`` (M,) (BatchNorm folded in, as the solver sees the layer).
      structured: prunes whole input units: takes ``groups``, each row's unit index (N,).
      takes_gram: solves the linear program from the Gram sums (`gram.GramStats`) of all the
        calibration rows, so the calibration set is bounded by time, not memory.
      options: which of ``shard`` (spread one layer's neurons over the devices) and ``progress``
        (a bar per layer) it takes.
      description: one line for listings and ``--help``.
    """

    name: str
    solve: Callable[..., LayerSolution]
    one_shot: bool = False
    trained_weights: bool = False
    structured: bool = False
    takes_gram: bool = False
    options: frozenset[str] = frozenset()
    description: str = ""

    def __call__(self, *args, **kwargs) -> LayerSolution:
        return self.solve(*args, **kwargs)


def as_pruner(solver: LayerPruner | Callable[..., LayerSolution]) -> LayerPruner:
    """``solver`` as a `LayerPruner`: one as it is; a plain function (e.g. a user's own solver)
    described by the keyword parameters it declares (``trained_kernel``, ``groups``, ``gram``,
    ``shard``, ``progress``)."""
    if isinstance(solver, LayerPruner):
        return solver
    if not callable(solver):
        raise TypeError(f"solver must be a LayerPruner or a function, got {type(solver).__name__}"
                        " (a pruner's name is looked up by hoyertrim.pruners.get_pruner).")
    parameters = inspect.signature(solver).parameters
    return LayerPruner(
        name=getattr(solver, "__name__", "solver"), solve=solver,
        trained_weights="trained_kernel" in parameters, structured="groups" in parameters,
        takes_gram="gram" in parameters,
        options=frozenset(option for option in OPTIONS if option in parameters))
