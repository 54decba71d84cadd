"""A model's jaxpr as one flat list of operations, to read and to run.

``jax.make_jaxpr(apply)(params, x)`` is the computation itself, whatever wrote it (linen, NNX,
plain JAX): every contraction, activation and add is an operation on variables. Calls that only
structure the program (``jit``, ``custom_jvp``/``custom_vjp`` bodies, ``remat``) are inlined, so
a layer's output is followed through ``nn.gelu``'s inner ``jit`` as through anything else, and
each operation knows the names of the calls it sat in (``scope``: ``('gelu',)``). Loops and
conditionals (``scan``, ``while``, ``cond``) stay single operations: what happens inside them
is not inspected, and a parameter they consume is reported as such.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping, Sequence

import jax
import jax.extend.core as jex_core
import numpy as np

__all__ = ["Const", "ELEMENTWISE", "Op", "Program", "bind_op"]

# Calls whose body is inlined: their operations are what a layer's output really meets.
_CALLS = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "remat", "checkpoint", "custom_lin"}


# Operations that act on each element independently (all operands of the output's shape, or
# scalars, or of size 1 along an axis, which they broadcast).
ELEMENTWISE = {"add", "sub", "mul", "div", "neg", "max", "min", "tanh", "logistic", "exp",
               "exp2", "expm1", "log", "log1p", "integer_pow", "pow", "sqrt", "rsqrt", "cbrt",
               "erf", "erfc", "erf_inv", "abs", "sign", "square", "select_n", "ge", "gt", "le",
               "lt", "eq", "ne", "and", "or", "not", "convert_element_type", "clamp", "tan",
               "atan", "sin", "cos", "floor", "ceil", "round", "is_finite", "copy", "copy_p",
               "stop_gradient", "reduce_precision", "nextafter", "atan2", "rem"}


@dataclasses.dataclass(eq=False)  # operations compare by identity
class Op:
    """One operation: its primitive, operands (variable ids or `Const`), results and params."""

    primitive: Any
    inputs: list
    outputs: list[int]
    params: dict
    scope: tuple[str, ...]  # names of the inlined calls this operation sits in

    @property
    def name(self) -> str:
        return self.primitive.name


@dataclasses.dataclass(frozen=True)
class Const:
    """A literal or closed-over constant operand."""

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


class Program:
    """A closed jaxpr flattened into one list of `Op` on unique integer variable ids.

    Args:
      closed_jaxpr: from ``jax.make_jaxpr``.
      known_inputs: ``{input position: value}`` of the inputs whose values are known (the
        params): operations that depend only on them and constants are *static* and can be
        evaluated (`value`), e.g. a BatchNorm's folded scale.
    """

    def __init__(self, closed_jaxpr, known_inputs: Mapping[int, Any] | None = None):
        self.ops: list[Op] = []
        self.shapes: dict[int, tuple] = {}
        self.dtypes: dict[int, Any] = {}
        self._ids = itertools.count()
        jaxpr = closed_jaxpr.jaxpr
        self.inputs = [self._new(v) for v in jaxpr.invars]
        self.outputs = self._inline(jaxpr, list(closed_jaxpr.consts), self.inputs, ())
        self.producer = {out: op for op in self.ops for out in op.outputs}
        self.consumers: dict[int, list[tuple[Op, int]]] = {}
        for op in self.ops:
            for position, atom in enumerate(op.inputs):
                if isinstance(atom, int):
                    self.consumers.setdefault(atom, []).append((op, position))
        known_inputs = dict(known_inputs or {})
        self.values = {self.inputs[i]: np.asarray(v) for i, v in known_inputs.items()}
        self.dynamic = {self.inputs[i] for i in range(len(self.inputs)) if i not in known_inputs}
        for op in self.ops:
            if any(isinstance(a, int) and a in self.dynamic for a in op.inputs):
                self.dynamic.update(op.outputs)

    def _new(self, var) -> int:
        new = next(self._ids)
        self.shapes[new] = tuple(getattr(var.aval, "shape", ()))
        self.dtypes[new] = getattr(var.aval, "dtype", None)
        return new

    def _inline(self, jaxpr, consts, inputs, scope):
        env = dict(zip(jaxpr.constvars, (Const(c) for c in consts)))
        env.update(zip(jaxpr.invars, inputs))

        def read(atom):
            return Const(atom.val) if isinstance(atom, jex_core.Literal) else env[atom]

        for eqn in jaxpr.eqns:
            operands = [read(a) for a in eqn.invars]
            body = _body(eqn)
            if body is not None:
                name = str(eqn.params.get("name", eqn.primitive.name))
                outs = self._inline(body[0], body[1], operands, scope + (name,))
                env.update(zip(eqn.outvars, outs))
                continue
            outs = [self._new(v) for v in eqn.outvars]
            env.update(zip(eqn.outvars, outs))
            self.ops.append(Op(eqn.primitive, operands, outs, dict(eqn.params), scope))
        return [read(a) for a in jaxpr.outvars]

    def is_static(self, atom) -> bool:
        """Whether an operand does not depend on the data (constants and params only)."""
        return isinstance(atom, Const) or atom not in self.dynamic

    def value(self, atom) -> np.ndarray:
        """The concrete value of an operand that does not depend on the data."""
        if isinstance(atom, Const):
            return np.asarray(atom.value)
        if atom not in self.values:
            op = self.producer[atom]
            results = bind_op(op, [self.value(a) for a in op.inputs])
            for out, result in zip(op.outputs, results):
                self.values[out] = np.asarray(result)
        return self.values[atom]

    def run(self, inputs: Sequence, record: Sequence[int] = ()) -> tuple[list, dict[int, Any]]:
        """Runs the program on ``inputs`` (one per jaxpr input, traced or concrete) and returns
        its outputs and the values of the variables ``record``. Call it inside ``jax.jit``."""
        env = dict(zip(self.inputs, inputs))

        def read(atom):
            return atom.value if isinstance(atom, Const) else env[atom]

        for op in self.ops:
            env.update(zip(op.outputs, bind_op(op, [read(a) for a in op.inputs])))
        return [read(a) for a in self.outputs], {var: env[var] for var in record}


def bind_op(op: Op, operands: list) -> list:
    results = op.primitive.bind(*operands, **op.primitive.get_bind_params(op.params))
    return list(results) if op.primitive.multiple_results else [results]


def trace(apply, *args) -> tuple[Any, list]:
    """``(closed jaxpr, flat input leaves)`` of ``apply(*args)``."""
    closed = jax.make_jaxpr(apply)(*args)
    return closed, jax.tree.leaves(args)
