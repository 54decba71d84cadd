"""The one registry of layer-wise pruning methods, by name: what the library, the pipeline, the
command line and the experiments choose from.

Every entry is a `LayerPruner` (`hoyertrim.nettrim.pruner`) that `nettrim.prune_network` runs
over a model's linear maps, in the parallel or the cascade scheme, with the same measured
certificate and report:

  nettrim        Net-Trim: the sparsest weights within ε (or at a kept fraction), λ search
  nettrim-units  structured Net-Trim: whole input units by a group norm (compaction removes them)
  nettrim-nm     Net-Trim with an N:M pattern (then re-fit on it)
  nettrim-admm   the Net-Trim paper's ADMM (a reference: Dense/Conv with bias, no folding)
  magnitude      one-shot: the largest |w|
  wanda          one-shot: |w|·‖x‖ per output unit (Sun et al., ICLR 2024)
  sparsegpt      one-shot: OBS updates block by block (Frantar & Alistarh, ICML 2023)
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from hoyertrim import peers
from hoyertrim.nettrim.admm import solve_layer_admm
from hoyertrim.nettrim.pruner import LayerPruner, as_pruner
from hoyertrim.nettrim.search import solve_layer, solve_layer_nm
from hoyertrim.nettrim.units import solve_layer_units

__all__ = ["PRUNERS", "get_pruner", "pruner_names"]


def _named(solver, name: str, description: str) -> LayerPruner:
    """A Net-Trim solver as a pruner: what it takes read off its signature (`as_pruner`)."""
    return dataclasses.replace(as_pruner(solver), name=name, description=description)


PRUNERS = MappingProxyType({pruner.name: pruner for pruner in (
    _named(solve_layer, "nettrim", "Net-Trim: the sparsest weights within ε of the trained layer"),
    _named(solve_layer_units, "nettrim-units",
           "structured Net-Trim: the fewest whole input units within ε"),
    _named(solve_layer_nm, "nettrim-nm", "Net-Trim with an N:M pattern, re-fit on it"),
    _named(solve_layer_admm, "nettrim-admm", "the Net-Trim paper's ADMM (reference)"),
    peers.magnitude_layer, peers.wanda_layer, peers.sparsegpt_layer)})


def pruner_names(*, one_shot: bool | None = None) -> tuple[str, ...]:
    """The registered names (only the one-shot ones, or only the others, when asked)."""
    return tuple(name for name, pruner in PRUNERS.items()
                 if one_shot is None or pruner.one_shot == one_shot)


def get_pruner(name: str) -> LayerPruner:
    """The pruner registered as ``name``; ValueError listing the names for any other."""
    try:
        return PRUNERS[name]
    except KeyError:
        raise ValueError(f"Unknown pruning method {name!r}; choose one of "
                         f"{', '.join(PRUNERS)}.") from None
