"""An NNX module class as a linen module, so every stage of the command line runs NNX models.

The training loop, checkpoints and stage directories speak linen (``model.init`` /
``model.apply(variables, x, train=...)``, collections ``params`` and ``batch_stats``). `NnxModel`
builds the user's NNX module inside a linen ``__call__`` (with ``rngs=nnx.Rngs(...)`` from
linen's RNG streams when its ``__init__`` takes them), loads the linen variables into it, runs it
in training or inference mode (``nnx.view`` with ``use_running_average`` / ``deterministic``) and
writes its state back. The variables are the module's own ``nnx.State``, as plain arrays at the
same paths (``{"params": {"conv1": {"kernel": ...}}, "batch_stats": {"bn1": {"mean": ...}}}``):
`to_module` puts a stage's arrays back into a fresh NNX module.

Like ``flax.nnx.bridge.ToLinen``, which this follows, the module is constructed on every call;
under ``jit`` its initializers are dead code.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import flax.linen as nn
from flax import nnx
from flax.core import FrozenDict
from flax.nnx import variablelib
from flax.nnx.bridge.wrappers import linen_rngs_dict

__all__ = ["NnxModel", "to_module"]

_MODE_FLAGS = ("use_running_average", "deterministic")


def _takes_rngs(nnx_class) -> bool:
    try:
        parameters = inspect.signature(nnx_class).parameters
    except (TypeError, ValueError):
        return True
    return "rngs" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _in_mode(module: nnx.Module, train: bool) -> nnx.Module:
    flags = {flag: not train for flag in _MODE_FLAGS
             if any(hasattr(m, flag) for _, m in nnx.iter_modules(module))}
    return nnx.view(module, **flags) if flags else module


class NnxModel(nn.Module):
    """A linen module that runs ``nnx_class(**kwargs, rngs=...)``.

    Attributes:
      nnx_class: an ``nnx.Module`` subclass (or a function returning an NNX module).
      kwargs: its keyword arguments (without ``rngs``).
    """

    nnx_class: Callable[..., nnx.Module]
    kwargs: Mapping[str, Any] = FrozenDict()

    def build(self, rngs: nnx.Rngs | None = None) -> nnx.Module:
        """A fresh NNX module (random weights)."""
        kwargs = dict(self.kwargs)
        if _takes_rngs(self.nnx_class):
            kwargs["rngs"] = rngs if rngs is not None else nnx.Rngs(0)
        module = self.nnx_class(**kwargs)
        if not isinstance(module, nnx.Module):
            raise TypeError(f"{getattr(self.nnx_class, '__name__', self.nnx_class)} built a "
                            f"{type(module).__name__}, not a flax.nnx.Module.")
        return module

    @nn.compact
    def __call__(self, x, train: bool = False):
        rngs = nnx.Rngs(**linen_rngs_dict(self, add_default=True))
        module = self.build(rngs)
        if not self.is_initializing():
            states = [dict(tree) for tree in self.variables.values()]
            nnx.update(module, nnx.merge_state(*states) if states else {})
        out = _in_mode(module, train)(x)
        collections: dict[str, dict] = {}
        for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.RngState))):
            name = variablelib.variable_name_from_type(type(variable), allow_register=True)
            collections.setdefault(name, {})[tuple(str(k) for k in path)] = variable.get_value()
        for name, flat in collections.items():
            if self.is_mutable_collection(name):
                for key, tree in nnx.traversals.unflatten_mapping(flat).items():
                    self.put_variable(name, key, tree)
        return out


def to_module(model: NnxModel, variables: Mapping) -> nnx.Module:
    """The NNX module of ``model`` with a stage's ``variables`` (``{"params": ..., ...}``) in it,
    in training mode as the user constructed it."""
    module = model.build(nnx.Rngs(0))
    nnx.update(module, nnx.merge_state(*[dict(t) for t in variables.values()]))
    return module


def nnx_class_of(target) -> bool:
    """Whether ``target`` is an NNX module class."""
    return isinstance(target, type) and issubclass(target, nnx.Module)

