"""What follows each layer, read off the model's jaxpr: it decides which program certifies it.

The ReLU program certifies ‖relu(ẑ) − relu(z)‖, so it may only be used where the layer's output
reaches the rest of the network through a ReLU alone — possibly after per-channel affine steps
(inference-mode BatchNorm, a scale, a shift), which are folded into the problem. Everything else
(gelu, tanh, a residual add, an output used twice, the network's output) gets the linear program
on the pre-activation. Nothing is assumed: the model is traced with each layer's output replaced
by an input of the traced function, and the chain of operations that consume it is walked
(through ``jit``/``custom_jvp`` calls, which are inlined). Any operation the walk does not know
ends it with the linear program and a reason that names the operation.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.extend.core as jex_core
import numpy as np

# Calls whose body is inlined: their operations are what the layer's output really meets.
_CALLS = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "remat", "checkpoint", "custom_lin"}
_PASS_THROUGH = {"convert_element_type", "copy", "copy_p", "optimization_barrier",
                 "stop_gradient"}
_LAYOUT = {"reshape", "squeeze", "expand_dims", "transpose", "broadcast_in_dim"}
_AFFINE = {"add", "sub", "mul", "div"}
# Activations recognised by the primitive or by the name of the function they are called in,
# with their Lipschitz constants (max |σ'|): the linear program's bound carries over through them.
_LIPSCHITZ = {"tanh": 1.0, "logistic": 0.25, "sigmoid": 0.25, "gelu": 1.129, "silu": 1.1,
              "swish": 1.1, "elu": 1.0, "leaky_relu": 1.0, "softplus": 1.0, "relu6": 1.0,
              "hard_tanh": 1.0, "celu": 1.0, "selu": 1.7581, "log_sigmoid": 1.0,
              "soft_sign": 1.0, "hard_sigmoid": 1.0 / 6, "hard_silu": 1.5, "mish": 1.09}


@dataclasses.dataclass(frozen=True)
class Follower:
    """What follows a layer, as far as Net-Trim's programs are concerned.

    Attributes:
      program: ``"relu"`` (the output reaches the network only through relu(scale·z + shift))
        or ``"linear"`` (certify the pre-activation z itself).
      reason: why, in words.
      scale, shift: (M,) the folded per-channel affine map before the ReLU (relu program).
      activation: the recognised activation after the layer (linear program), if any.
      lipschitz: its Lipschitz constant, when known: ‖σ(ẑ) − σ(z)‖ ≤ L‖ẑ − z‖.
    """

    program: str
    reason: str
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    activation: str | None = None
    lipschitz: float | None = None


def relu_follower(num_channels: int, reason: str) -> Follower:
    return Follower("relu", reason, np.ones(num_channels), np.zeros(num_channels), "relu")


@dataclasses.dataclass
class _Op:
    primitive: Any
    inputs: list  # variable ids (int) or _Const
    outputs: list[int]
    params: dict
    scope: tuple[str, ...]  # names of the inlined calls this operation sits in


@dataclasses.dataclass(frozen=True)
class _Const:
    value: Any


def _body(eqn):
    if eqn.primitive.name not in _CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
            return sub.jaxpr, list(sub.consts)
        if hasattr(sub, "eqns"):
            return sub, []
    return None


class _Program:
    """A jaxpr flattened into one list of operations on unique variable ids."""

    def __init__(self, closed_jaxpr, known_inputs: Mapping[int, Any]):
        self.ops: list[_Op] = []
        self.shapes: dict[int, tuple] = {}
        self._ids = itertools.count()
        jaxpr = closed_jaxpr.jaxpr
        self.inputs = [self._new(v) for v in jaxpr.invars]
        self.outputs = self._inline(jaxpr, list(closed_jaxpr.consts), self.inputs, ())
        self.producer = {out: op for op in self.ops for out in op.outputs}
        self.consumers: dict[int, list[tuple[_Op, int]]] = {}
        for op in self.ops:
            for position, atom in enumerate(op.inputs):
                if isinstance(atom, int):
                    self.consumers.setdefault(atom, []).append((op, position))
        self.values = {self.inputs[i]: np.asarray(v) for i, v in known_inputs.items()}
        self.dynamic = {self.inputs[i] for i in range(len(self.inputs)) if i not in known_inputs}
        for op in self.ops:
            if any(isinstance(a, int) and a in self.dynamic for a in op.inputs):
                self.dynamic.update(op.outputs)

    def _new(self, var) -> int:
        new = next(self._ids)
        self.shapes[new] = tuple(getattr(var.aval, "shape", ()))
        return new

    def _inline(self, jaxpr, consts, inputs, scope):
        env = dict(zip(jaxpr.constvars, (_Const(c) for c in consts)))
        env.update(zip(jaxpr.invars, inputs))

        def read(atom):
            return _Const(atom.val) if isinstance(atom, jex_core.Literal) else env[atom]

        for eqn in jaxpr.eqns:
            inputs_ = [read(a) for a in eqn.invars]
            body = _body(eqn)
            if body is not None:
                name = str(eqn.params.get("name", eqn.primitive.name))
                outs = self._inline(body[0], body[1], inputs_, scope + (name,))
                env.update(zip(eqn.outvars, outs))
                continue
            outs = [self._new(v) for v in eqn.outvars]
            env.update(zip(eqn.outvars, outs))
            self.ops.append(_Op(eqn.primitive, inputs_, outs, dict(eqn.params), scope))
        return [read(a) for a in jaxpr.outvars]

    def is_static(self, atom) -> bool:
        return isinstance(atom, _Const) or atom not in self.dynamic

    def value(self, atom) -> np.ndarray:
        """The concrete value of an operand that does not depend on the data."""
        if isinstance(atom, _Const):
            return np.asarray(atom.value)
        if atom not in self.values:
            op = self.producer[atom]
            results = op.primitive.bind(*(self.value(a) for a in op.inputs), **op.params)
            results = results if op.primitive.multiple_results else [results]
            for out, result in zip(op.outputs, results):
                self.values[out] = np.asarray(result)
        return self.values[atom]


def _per_channel(value: np.ndarray, shape: tuple, uniform_only: bool) -> np.ndarray | None:
    """(M,) view of an operand broadcast against an output of ``shape``, or None when it is not
    constant along every axis but the last (or not uniform, when ``uniform_only``)."""
    try:
        full = np.broadcast_to(value, shape)
    except ValueError:
        return None
    rows = full.reshape(-1, shape[-1]) if shape else full.reshape(1, 1)
    if not np.all(rows == rows[:1]):
        return None
    if uniform_only and not np.all(rows == rows.flat[0]):
        return None
    return rows[0].astype(np.float64)


def _activation_name(op: _Op) -> str:
    for name in reversed(op.scope):
        if name in _LIPSCHITZ:
            return name
    return op.primitive.name


def _follow(program: _Program, var: int, num_channels: int) -> Follower:
    scale, shift = np.ones(num_channels), np.zeros(num_channels)
    folded: list[str] = []
    layout_changed = False
    while True:
        if var in program.outputs:
            return Follower("linear", "its output is (part of) the model's output")
        uses = program.consumers.get(var, [])
        if not uses:
            return Follower("linear", "its output is not used by the model")
        if len(uses) > 1:
            names = sorted({_activation_name(op) for op, _ in uses})
            known = [n for n in names if n in _LIPSCHITZ]
            if len(known) == 1 and not folded:
                return Follower("linear", f"followed by {known[0]} (not ReLU)",
                                activation=known[0], lipschitz=_LIPSCHITZ[known[0]])
            return Follower("linear", f"its output feeds {len(uses)} operations "
                            f"({', '.join(names)}), not a ReLU alone (e.g. a residual add, or "
                            "an activation such as gelu)")
        op, position = uses[0]
        name = op.primitive.name
        others = [a for i, a in enumerate(op.inputs) if i != position]
        shape = program.shapes[var]
        out = op.outputs[0] if op.outputs else None
        if name == "max" and len(others) == 1 and program.is_static(others[0]) and np.all(
                program.value(others[0]) == 0):
            steps = f" after folding {', '.join(folded)}" if folded else ""
            return Follower("relu", f"its output reaches the network only through a ReLU{steps}",
                            scale, shift, "relu")
        if name in _AFFINE and len(others) == 1 and program.is_static(others[0]):
            k = _per_channel(program.value(others[0]), shape, layout_changed)
            if k is not None and not (name == "div" and position == 1):
                if name == "add":
                    shift = shift + k
                elif name == "sub" and position == 0:
                    shift = shift - k
                elif name == "sub":
                    scale, shift = -scale, k - shift
                elif name == "mul":
                    scale, shift = scale * k, shift * k
                else:
                    scale, shift = scale / k, shift / k
                folded.append(name)
                var = out
                continue
        if name in _PASS_THROUGH:
            var = out
            continue
        if name == "neg":
            scale, shift = -scale, -shift
            folded.append(name)
            var = out
            continue
        uniform = np.all(scale == scale[0]) and np.all(shift == shift[0])
        if name in _LAYOUT and uniform:
            # relu commutes with moving entries around; a per-channel map after it would not.
            layout_changed = True
            var = out
            continue
        label = _activation_name(op)
        lipschitz = _LIPSCHITZ.get(label) if not folded else None
        return Follower("linear", f"followed by {label} (not ReLU)",
                        activation=label if label in _LIPSCHITZ else None, lipschitz=lipschitz)


def followers(model: nn.Module, variables: Mapping, sample, apply_kwargs: Mapping,
              output_shapes: Mapping[str, Any]) -> dict[str, Follower]:
    """For each layer path in ``output_shapes`` ({path: ShapeDtypeStruct of its output}), what
    follows it in ``model.apply(variables, sample, **apply_kwargs)``."""

    def run(variables, images, overrides):
        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__":
                path = "/".join(context.module.path)
                if path in overrides:
                    return overrides[path]
            return out

        with nn.intercept_methods(interceptor):
            return model.apply(variables, images, **apply_kwargs)

    overrides = dict(output_shapes)
    closed = jax.make_jaxpr(run)(variables, sample, overrides)
    variable_leaves = jax.tree.leaves(variables)
    sample_leaves = jax.tree.leaves(sample)
    override_leaves, _ = jax.tree_util.tree_flatten_with_path(overrides)
    program = _Program(closed, dict(enumerate(variable_leaves)))
    first_override = len(variable_leaves) + len(sample_leaves)
    result = {}
    for index, (path, _) in enumerate(override_leaves):
        name = path[0].key
        var = program.inputs[first_override + index]
        result[name] = _follow(program, var, program.shapes[var][-1])
    return result


def override(followers_: dict[str, Follower], user: Mapping[str, str] | None,
             num_channels: Callable[[str], int]) -> dict[str, Follower]:
    """Applies the user's per-layer declarations (``"relu"`` or ``"linear"``)."""
    result = dict(followers_)
    for name, program in (user or {}).items():
        if name not in result:
            raise ValueError(f"activations names unknown layer {name!r}; layers are "
                             f"{list(result)}.")
        if program == "relu":
            result[name] = relu_follower(num_channels(name), "declared ReLU by the user")
        elif program == "linear":
            result[name] = Follower("linear", "declared linear by the user")
        else:
            raise ValueError(f"activations[{name!r}] must be 'relu' or 'linear', got {program!r}.")
    return result
