"""Net-Trim: convex, layer-wise pruning of trained networks with a certified, checked error.

Aghasi, Abdi, Nguyen & Romberg, "Net-Trim: Convex Pruning of Deep Neural Networks with Performance
Guarantee", NIPS 2017 (journal version SIMODS 2020). For one trained layer with inputs ``X``,
outputs ``Y = relu(X W)`` and active set Ω = {Y > 0}, Net-Trim finds the sparsest ``U`` with

    ‖(X U − Y)_Ω‖_F ≤ ε‖Y‖_F      and      (X U)_{Ωᶜ} ≤ V_{Ωᶜ}      (V = 0 in the parallel scheme)

so that ‖relu(X U) − Y‖_F ≤ ε‖Y‖_F: the pruned layer provably stays within ε of the trained one.

Modules, bottom to top:
  problem   one layer's signals, validation, normalization, the measured certificate
  fista     the restarted FISTA kernel (`jaxopt.ProximalGradient` steps, vmapped over neurons)
  gram      the linear program in Gram form (sums over rows: cost and memory independent of P)
  search    the λ search meeting ε or a kept fraction; `solve_layer`
  units     structured Net-Trim: whole input units (group norm); `solve_layer_units`
  calibration  the layers' calibration signals, streamed batch by batch
  admm      the paper's ADMM (reference)
  pruned_layer  `PrunedLayer`: one map's record (ε requested / certified, measured, solve)
  network   `prune_network` (parallel / cascade) over the linear maps `hoyertrim.inspection`
            finds in any model's computation, the checked certificate, save / load
  pruner    the `LayerPruner` interface every layer solver implements (the peers too)
"""

from hoyertrim.nettrim.admm import solve_layer_admm
from hoyertrim.inspection.graph import Follower
from hoyertrim.nettrim.network import CertificateError, PrunedNetwork, load_pruned, \
    prune_network, save_pruned
from hoyertrim.nettrim.problem import LayerSolution
from hoyertrim.nettrim.pruned_layer import PrunedLayer, certified_epsilon
from hoyertrim.nettrim.pruner import LayerPruner, as_pruner
from hoyertrim.nettrim.search import KEPT_FRACTION_TOLERANCE, SolverOptions, solve_layer, \
    solve_layer_nm
from hoyertrim.nettrim.units import solve_layer_units

__all__ = ["CertificateError", "Follower", "KEPT_FRACTION_TOLERANCE", "LayerPruner",
           "LayerSolution", "PrunedLayer", "PrunedNetwork", "SolverOptions", "as_pruner",
           "certified_epsilon", "load_pruned", "prune_network", "save_pruned", "solve_layer",
           "solve_layer_admm", "solve_layer_nm", "solve_layer_units"]
