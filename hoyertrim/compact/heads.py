"""Whole attention heads removed: fewer heads computed from q/k/v to the output projection.

A multi-head attention written the ordinary way (Flax's ``MultiHeadDotProductAttention``, an
``einsum`` of one's own) projects its input with kernels (D, H, hd) — heads and head dimension as
free axes — mixes the heads only through per-head batched contractions (q·kᵀ, the softmax over
keys, weights·v) and sums them in the output projection, whose kernel (H, hd, D) contracts both.
A head whose slab of the output kernel is all zero is read by no one: its q, k and v need not be
computed. That is the group DepGraph couples for a head — q/k/v/out of one head — found here from
the computation:

- `head_groups`: each output projection (a map contracting two or more axes of its data) with
  zero slabs along its first contracted axis, and the projections that feed it without another
  map in between (a map with two or more free axes whose first has the same size): a
  consumer's dead heads are removed from all of them;
- `Heads`: a value computed only at the kept heads along one of its axes; `heads_op` runs an
  operation on such values (elementwise ops, per-head batched contractions, reductions over
  other axes, broadcasts, transposes and reshapes that keep the head axis whole) or answers
  None, when the engine rejects the plan: the removed heads' values were never computed, so a
  head axis that reaches anything else (a sum over heads, the model's output) keeps every head.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from hoyertrim.inspection.program import ELEMENTWISE, Op, Program, bind_op

__all__ = ["Heads", "contraction_axes", "head_groups", "heads_op"]

@dataclasses.dataclass(frozen=True)
class Heads:
    """A value computed at heads ``keep`` (of ``width``) along ``axis`` only."""

    array: Any
    axis: int
    keep: np.ndarray
    width: int

    def with_array(self, array, axis: int) -> "Heads":
        return Heads(array, axis, self.keep, self.width)


def contraction_axes(op: Op, position: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(kernel's contracted axes, data's contracted axes) of a map whose kernel is operand
    ``position``."""
    (lhs_c, rhs_c), _ = op.params["dimension_numbers"]
    return (tuple(rhs_c), tuple(lhs_c)) if position == 1 else (tuple(lhs_c), tuple(rhs_c))


def head_groups(program: Program, maps: dict, operands: dict) -> dict[str, tuple[np.ndarray,
                                                                                  int]]:
    """{map: (kept heads, kernel's head axis)} for every head group with dead heads.

    Args:
      maps: {layer: (op, kernel position, data variable)} of the model's ``dot_general`` maps.
      operands: {layer: the kernel as its contraction consumes it}.
    """
    by_op = {op: name for name, (op, _, _) in maps.items()}
    plans: dict[str, tuple[np.ndarray, int]] = {}
    taken: set[str] = set()
    for name, (op, position, data) in maps.items():
        kernel_c, data_c = contraction_axes(op, position)
        if len(data_c) < 2:
            continue
        kernel = operands[name]
        axis = kernel_c[0]
        width = kernel.shape[axis]
        alive = np.any(np.moveaxis(kernel, axis, 0).reshape(width, -1) != 0, axis=1)
        if alive.all() or not alive.any():
            continue
        producers = _producers(program, data, by_op, maps, operands, width)
        if not producers or taken & set(producers):
            continue
        keep = np.flatnonzero(alive)
        plans[name] = (keep, axis)
        plans.update({p: (keep, axis_) for p, axis_ in producers.items()})
        taken |= set(producers) | {name}
    return plans


def _producers(program: Program, data: int, by_op: dict, maps: dict, operands: dict,
               width: int) -> dict[str, int]:
    """{map: its kernel's head axis} of the maps with ≥ 2 free axes, the first of size
    ``width``, that ``data`` is computed from without another map in between."""
    found: dict[str, int] = {}
    seen, stack = set(), [data]
    while stack:
        var = stack.pop()
        op = program.producer.get(var) if isinstance(var, int) else None
        if op is None or id(op) in seen:
            continue
        seen.add(id(op))
        if op in by_op:
            name = by_op[op]
            _, position, _ = maps[name]
            kernel_c, _ = contraction_axes(op, position)
            kernel = operands[name]
            free = [a for a in range(kernel.ndim) if a not in kernel_c]
            if len(free) >= 2 and kernel.shape[free[0]] == width:
                found[name] = free[0]
            continue
        stack.extend(a for a in op.inputs if isinstance(a, int))
    return found


def heads_op(program: Program, op: Op, values: list) -> list | None:
    """``op`` on operands some of which are `Heads` (all with the same kept heads), as `Heads`;
    None when the operation needs the removed heads."""
    heads = [v for v in values if isinstance(v, Heads)]
    first = heads[0]
    if any(h.width != first.width or not np.array_equal(h.keep, first.keep) for h in heads):
        return None
    rule = _RULES.get(op.name)
    if op.name in ELEMENTWISE:
        rule = _elementwise
    if rule is None:
        return None
    result = rule(program, op, values, first)
    return None if result is None else [result]


def _take(value, keep, axis):
    return jnp.take(jnp.asarray(value), keep, axis=axis)


def _elementwise(program, op, values, first: Heads):
    if any(isinstance(v, Heads) and v.axis != first.axis for v in values):
        return None
    ndim = len(program.shapes[op.outputs[0]])
    arrays = []
    for value in values:
        if isinstance(value, Heads):
            arrays.append(value.array)
        elif np.ndim(value) == 0:
            arrays.append(value)
        elif np.ndim(value) == ndim and np.shape(value)[first.axis] == 1:
            arrays.append(value)
        elif np.ndim(value) == ndim and np.shape(value)[first.axis] == first.width:
            arrays.append(_take(value, first.keep, first.axis))
        else:
            return None
    return first.with_array(bind_op(op, arrays)[0], first.axis)


def _broadcast_in_dim(program, op, values, first: Heads):
    shape = list(op.params["shape"])
    axis = op.params["broadcast_dimensions"][first.axis]
    shape[axis] = len(first.keep)
    params = dict(op.params, shape=tuple(shape))
    return first.with_array(bind_op(dataclasses.replace(op, params=params), [first.array])[0],
                            axis)


def _reduce(program, op, values, first: Heads):
    axes = tuple(op.params["axes"])
    if first.axis in axes:
        return None
    return first.with_array(bind_op(op, [first.array])[0],
                            first.axis - sum(a < first.axis for a in axes))


def _transpose(program, op, values, first: Heads):
    permutation = tuple(op.params["permutation"])
    return first.with_array(bind_op(op, [first.array])[0], permutation.index(first.axis))


def _squeeze(program, op, values, first: Heads):
    ndim = len(program.shapes[op.inputs[0]])
    dims = [d % ndim for d in op.params["dimensions"]]
    if first.axis in dims:
        return None
    return first.with_array(bind_op(op, [first.array])[0],
                            first.axis - sum(d < first.axis for d in dims))


def _reshape(program, op, values, first: Heads):
    if op.params.get("dimensions") is not None:
        return None
    old = program.shapes[op.inputs[0]]
    new = list(op.params["new_sizes"])
    before, after = math.prod(old[:first.axis]), math.prod(old[first.axis + 1:])
    for axis in range(len(new)):  # the head axis must stay one axis of its own
        if (math.prod(new[:axis]) == before and new[axis] == first.width
                and math.prod(new[axis + 1:]) == after):
            new[axis] = len(first.keep)
            params = dict(op.params, new_sizes=tuple(new))
            return first.with_array(
                bind_op(dataclasses.replace(op, params=params), [first.array])[0], axis)
    return None


def _dot_general(program, op, values, first: Heads):
    """A contraction batched over heads (q·kᵀ, weights·v), or one operand's heads as a free
    axis; never a contraction over heads (that is the output projection, a map)."""
    (contract, batch) = op.params["dimension_numbers"]
    ndims = [len(program.shapes[a]) if isinstance(a, int) else np.ndim(a.value)
             for a in op.inputs]
    free = [[a for a in range(ndims[i]) if a not in contract[i] and a not in batch[i]]
            for i in range(2)]
    arrays, out_axis = list(values), None
    for i, value in enumerate(values):
        if not isinstance(value, Heads):
            continue
        arrays[i] = value.array
        if value.axis in contract[i]:
            return None
        if value.axis in batch[i]:
            k = list(batch[i]).index(value.axis)
            other = values[1 - i]
            other_axis = batch[1 - i][k]
            if isinstance(other, Heads):
                if other.axis != other_axis:
                    return None
            elif np.shape(other)[other_axis] == first.width:
                arrays[1 - i] = _take(other, first.keep, other_axis)
            else:
                return None
            axis = k
        else:
            if isinstance(values[1 - i], Heads) and values[1 - i].axis not in batch[1 - i]:
                return None
            axis = len(batch[0]) + (len(free[0]) if i == 1 else 0) + free[i].index(value.axis)
        if out_axis is not None and out_axis != axis:
            return None
        out_axis = axis
    return first.with_array(bind_op(op, arrays)[0], out_axis)


_RULES = {"broadcast_in_dim": _broadcast_in_dim, "reduce_sum": _reduce, "reduce_max": _reduce,
          "reduce_min": _reduce, "transpose": _transpose, "squeeze": _squeeze,
          "reshape": _reshape, "dot_general": _dot_general}
