"""Any model as one pure function of its params: ``apply(params, x) -> output``.

What a user brings — a linen module and its variables, an NNX module (and optionally its
``State``), or a plain function ``apply(params, x)`` with its params pytree — becomes a
`Computation`: the function, the params in the user's own kind of tree (linen params dict,
``nnx.State``, any pytree), and how to hand a changed params tree back in the user's terms (a
variables dict, a new NNX module, the params). Everything that inspects or prunes a model works
on this one form, so nothing downstream knows which framework wrote the model.

NNX models are run in inference mode (``nnx.view`` with ``use_running_average=True`` and
``deterministic=True`` where a submodule has those attributes): calibration must not update
BatchNorm statistics or drop units. Linen models take what they need through ``apply_kwargs``
(e.g. ``{"train": False}``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
from flax import nnx

__all__ = ["Computation", "as_computation", "split_variables"]

_INFERENCE_FLAGS = ("use_running_average", "deterministic")


@dataclasses.dataclass(frozen=True)
class Computation:
    """A model as ``apply(params, x)``.

    Attributes:
      apply: ``(params, x) -> output`` (the output may be any pytree; its first leaf is the
        model's prediction).
      params: the trained params, in the user's own kind of tree.
      kind: ``"linen"``, ``"nnx"`` or ``"function"``.
      rebuild: ``params -> `` what the user works with: the linen variables dict (or params,
        if only params were given), a new NNX module in the original module's mode, or the
        params for a plain function.
    """

    apply: Callable[[Any, Any], Any]
    params: Any
    kind: str
    rebuild: Callable[[Any], Any]


def split_variables(variables) -> tuple[Any, dict, bool]:
    """(params, the other collections, whether a variables dict was given)."""
    if isinstance(variables, Mapping) and "params" in variables:
        return variables["params"], {k: v for k, v in variables.items() if k != "params"}, True
    return variables, {}, False


def _inference_view(module: nnx.Module) -> nnx.Module:
    flags = {flag: True for flag in _INFERENCE_FLAGS
             if any(hasattr(m, flag) for _, m in nnx.iter_modules(module))}
    return nnx.view(module, **flags) if flags else module


def as_computation(model, variables=None, *, apply_kwargs: Mapping | None = None
                   ) -> Computation:
    """The `Computation` of a linen module + variables, an NNX module (+ optional params
    ``State``), or a plain function + params.

    Args:
      model: a ``flax.linen.Module``, a ``flax.nnx.Module`` or a callable ``apply(params, x)``.
      variables: linen: the params tree or the full variables dict (other collections are kept
        as they are); NNX: None (the module's own params) or an ``nnx.State`` of its params;
        function: its params pytree.
      apply_kwargs: keyword arguments every call of the model needs (e.g. ``{"train": False}``
        for a linen model with BatchNorm).
    """
    apply_kwargs = dict(apply_kwargs or {})
    if isinstance(model, nn.Module):
        if variables is None:
            raise ValueError("A linen model needs its variables (or params) to be inspected.")
        params, collections, as_variables = split_variables(flax.core.unfreeze(variables))

        def apply_linen(p, x):
            return model.apply({"params": p, **collections}, x, **apply_kwargs)

        def rebuild_linen(p):
            return {"params": p, **collections} if as_variables else p

        return Computation(apply_linen, params, "linen", rebuild_linen)
    if isinstance(model, nnx.Module):
        graphdef, own_params, rest = nnx.split(_inference_view(model), nnx.Param, ...)
        params = own_params if variables is None else variables
        if isinstance(params, nnx.State) and \
                jax.tree.structure(params) != jax.tree.structure(own_params):
            params = params.filter(nnx.Param)  # nnx.state(model): keep its params
        if jax.tree.structure(params) != jax.tree.structure(own_params):
            raise ValueError("The NNX params given do not match the module's: pass "
                             "nnx.state(model, nnx.Param) of this model (or None).")
        train_graphdef, _, train_rest = nnx.split(model, nnx.Param, ...)

        def apply_nnx(p, x):
            return nnx.merge(graphdef, p, rest)(x, **apply_kwargs)

        def rebuild_nnx(p):
            return nnx.merge(train_graphdef, p, train_rest)

        return Computation(apply_nnx, params, "nnx", rebuild_nnx)
    if callable(model):
        if variables is None:
            raise ValueError("A plain function needs its params: pass apply(params, x) and the "
                             "params pytree.")

        def apply_function(p, x):
            return model(p, x, **apply_kwargs)

        return Computation(apply_function, variables, "function", lambda p: p)
    raise TypeError(f"Expected a flax.linen.Module, a flax.nnx.Module or a function "
                    f"apply(params, x); got {type(model).__name__}.")
