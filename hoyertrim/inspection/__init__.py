"""The model as a computation: linear maps found in the jaxpr, for linen, NNX and plain functions.

Modules, bottom to top:
  program       a jaxpr as one flat list of operations (calls inlined), to read and to run
  computation   any model as ``apply(params, x)`` with its params in the user's kind of tree
  linear_maps   every contraction with a parameter as ``z = rows(x) @ U + b``; what is refused;
                each map's units as axes of its kernel (`unit_groupings`)
  coupling      output units of several maps removable only together (a residual stream)
  graph         what follows a map's output (ReLU after folded affine steps, or not)
  layers        `inspect_model`, `record_maps`, the `Recorder` of each map's signals,
                `contraction_filter`
"""

from hoyertrim.inspection.computation import Computation, as_computation
from hoyertrim.inspection.coupling import CoupledGroup, coupled_groups
from hoyertrim.inspection.graph import Follower
from hoyertrim.inspection.layers import Inspection, Recorder, contraction_filter, inspect_model, \
    record_maps
from hoyertrim.inspection.linear_maps import LinearMap, Refusal, output_axes, select_maps, \
    unit_groupings

__all__ = ["Computation", "CoupledGroup", "Follower", "Inspection", "LinearMap", "Recorder",
           "Refusal", "as_computation", "contraction_filter", "coupled_groups", "inspect_model",
           "output_axes", "record_maps", "select_maps", "unit_groupings"]
