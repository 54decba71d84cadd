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
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np

from hoyertrim.inspection.program import Op, Program, bind_op

__all__ = ["Follower", "follow", "followers", "override", "relu_follower"]

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



def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


# The same activations as functions, to recognise one that jax writes inline (``nn.gelu`` is
# add, integer_pow, mul, tanh on the layer's output) by what it computes.
_FUNCTIONS = {
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
    "gelu_exact": lambda x: x * 0.5 * (1 + _erf(x / np.sqrt(2))),
    "silu": lambda x: x * _sigmoid(x), "tanh": np.tanh, "sigmoid": _sigmoid,
    "softplus": lambda x: np.logaddexp(x, 0), "elu": lambda x: np.where(x > 0, x, np.expm1(x)),
    "leaky_relu": lambda x: np.where(x >= 0, x, 0.01 * x),
    "relu6": lambda x: np.clip(x, 0, 6), "hard_tanh": lambda x: np.clip(x, -1, 1),
    "log_sigmoid": lambda x: -np.logaddexp(-x, 0), "soft_sign": lambda x: x / (1 + np.abs(x)),
    "mish": lambda x: x * np.tanh(np.logaddexp(x, 0)),
}
_LIPSCHITZ["gelu_exact"] = 1.129
_ELEMENTWISE = {"add", "sub", "mul", "div", "neg", "tanh", "logistic", "exp", "expm1", "log",
                "log1p", "integer_pow", "pow", "sqrt", "rsqrt", "erf", "erfc", "abs", "sign",
                "max", "min", "square", "select_n", "ge", "gt", "le", "lt", "eq", "ne",
                "convert_element_type", "clamp", "tan", "atan"}
_REGION_OPS = 40  # the most operations an inline activation is looked for in


def _erf(x):
    return np.vectorize(math.erf)(x)


def _scalar_like(program, atom) -> bool:
    """A static operand that is the same number everywhere (a constant of the formula)."""
    if not program.is_static(atom):
        return False
    value = program.value(atom)
    return value.size == 0 or bool(np.all(value == value.flat[0]))


def _inline_activation(program: Program, var: int) -> str | None:
    """The name of the known activation the elementwise operations on ``var`` compute, when
    they merge into one result: found by running them on test values, not by their names."""
    region, frontier = [], [var]
    inside = {var}
    while frontier:
        current = frontier.pop()
        for op, _ in program.consumers.get(current, []):
            if op in region:
                continue
            if op.name not in _ELEMENTWISE:
                continue  # where the region ends
            if len(region) >= _REGION_OPS:
                return None
            if not all(isinstance(a, int) and a in inside or _scalar_like(program, a)
                       for a in op.inputs):
                # an operand computed elsewhere: wait until it is reached, unless it never is
                if not all(isinstance(a, int) and (a in inside or not program.is_static(a))
                           or _scalar_like(program, a) for a in op.inputs):
                    return None
                continue
            region.append(op)
            inside.update(op.outputs)
            frontier.extend(op.outputs)
    escaping = [v for v in inside if v in program.outputs or any(
        op not in region for op, _ in program.consumers.get(v, []))]
    if len(escaping) != 1 or escaping[0] == var or not region:
        return None
    shape = program.shapes[var]
    size = int(np.prod(shape)) if shape else 1
    test = np.linspace(-8, 8, size).astype(np.float32).reshape(shape)
    values = {var: test}
    try:
        for op in sorted(region, key=program.ops.index):
            args = [values[a] if isinstance(a, int) and a in values else program.value(a)
                    for a in op.inputs]
            for out, result in zip(op.outputs, bind_op(op, args)):
                values[out] = np.asarray(result)
    except Exception:  # an operation that does not run on the test values: not recognised
        return None
    result = np.asarray(values[escaping[0]], np.float64).reshape(-1)
    x = test.astype(np.float64).reshape(-1)
    if result.shape != x.shape:
        return None
    for name, function in _FUNCTIONS.items():
        if np.allclose(result, function(x), rtol=1e-4, atol=1e-5):
            return name
    return None


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


def _per_channel(value: np.ndarray, shape: tuple, channels: int, uniform_only: bool
                 ) -> np.ndarray | None:
    """(M,) view of an operand broadcast against an output of ``shape`` whose trailing axes are
    the ``channels`` units, or None when it is not constant along the other axes (or not
    uniform, when ``uniform_only``)."""
    try:
        full = np.broadcast_to(value, shape)
    except ValueError:
        return None
    if math.prod(shape) % channels:
        return None
    rows = full.reshape(-1, channels) if shape else full.reshape(1, 1)
    if not np.all(rows == rows[:1]):
        return None
    if uniform_only and not np.all(rows == rows.flat[0]):
        return None
    return rows[0].astype(np.float64)


def _activation_name(op: Op) -> str:
    for name in reversed(op.scope):
        if name in _LIPSCHITZ:
            return name
    return op.primitive.name


def follow(program: Program, var: int, num_channels: int, units_trailing: bool = True
           ) -> Follower:
    """What follows variable ``var`` (a layer's output with ``num_channels`` output units) in
    ``program``. ``units_trailing``: the units are the output's last axes, so per-channel
    affine steps can be folded (otherwise only uniform ones)."""
    scale, shift = np.ones(num_channels), np.zeros(num_channels)
    folded: list[str] = []
    layout_changed = not units_trailing
    while True:
        if var in program.outputs:
            return Follower("linear", "its output is (part of) the model's output")
        uses = program.consumers.get(var, [])
        if not uses:
            return Follower("linear", "its output is not used by the model")
        if len(uses) > 1:
            inline = None if folded else _inline_activation(program, var)
            if inline is not None:
                return Follower("linear", f"followed by {inline} (not ReLU)", activation=inline,
                                lipschitz=_LIPSCHITZ[inline])
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
            k = _per_channel(program.value(others[0]), shape, num_channels, layout_changed)
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
        if label not in _LIPSCHITZ and not folded:
            label = _inline_activation(program, var) or label
        lipschitz = _LIPSCHITZ.get(label) if not folded else None
        return Follower("linear", f"followed by {label} (not ReLU)",
                        activation=label if label in _LIPSCHITZ else None, lipschitz=lipschitz)


def followers(model: nn.Module, variables: Mapping, sample, apply_kwargs: Mapping,
              output_shapes: Mapping[str, Any]) -> dict[str, Follower]:
    """For each linen module path in ``output_shapes`` ({path: ShapeDtypeStruct of its
    output}), what follows that module's output in ``model.apply(variables, sample,
    **apply_kwargs)`` (compaction's view of a linen model; everything else uses `follow` on the
    linear maps found in the computation)."""

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
    program = Program(closed, dict(enumerate(variable_leaves)))
    first_override = len(variable_leaves) + len(sample_leaves)
    result = {}
    for index, (path, _) in enumerate(override_leaves):
        name = path[0].key
        var = program.inputs[first_override + index]
        result[name] = follow(program, var, program.shapes[var][-1])
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
