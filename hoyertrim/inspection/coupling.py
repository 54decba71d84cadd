"""Coupled output units, read off the computation: units of different maps that must go together.

A unit of a map's output can be removed only if nothing else needs its value — but where two
maps' outputs are added feature by feature (a residual add: the stem's channel c plus every
block's second conv's channel c), the sum's feature c is written by all of them, so it goes
only when it is dead in every writer. That set is DepGraph's group (Fang et al., CVPR 2023),
found here by following each map's output features through the traced computation:

- a map's output (one output axis, last) starts with its own units, one per feature;
- operations that act on each feature alone (elementwise ops with per-feature constants,
  BatchNorm at inference, activations, pooling over positions, layout ops that keep the feature
  axis last) carry them; an elementwise op of two followed values couples their features one
  to one; zero channels padded on (a ResNet's option-A shortcut) shift them; a concatenation
  along features places them side by side;
- anything else that reads a followed feature (a LayerNorm's mean over features, attention, an
  add with a value that is not followed, the model's output) pins its units: they are not
  removable, and neither is the rest of their group.

`coupled_groups` returns the groups of two or more units that can be removed together; a unit
alone in its group (a block's inner channel) is its own map's business. `compact` removes such a
group when every member is dead; a group penalty over it (`penalties.coupled_group_norms`)
makes them die together.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hoyertrim.inspection.program import ELEMENTWISE, Const, Program

__all__ = ["CoupledGroup", "coupled_groups"]

_REDUCE = {"reduce_sum", "reduce_max", "reduce_min"}


@dataclasses.dataclass(frozen=True)
class CoupledGroup:
    """Output units of several maps that are removable only together.

    Attributes:
      members: ``(layer, output unit)`` pairs, sorted.
    """

    members: tuple[tuple[str, int], ...]

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(sorted({layer for layer, _ in self.members}))


class _Groups:
    """Union-find over (layer, unit) members, with pinned members."""

    def __init__(self):
        self.parent: dict = {}
        self.pinned: set = set()

    def find(self, member):
        self.parent.setdefault(member, member)
        while self.parent[member] != member:
            self.parent[member] = self.parent[self.parent[member]]
            member = self.parent[member]
        return member

    def union(self, members) -> None:
        members = list(members)
        for other in members[1:]:
            self.parent[self.find(other)] = self.find(members[0])

    def pin(self, members) -> None:
        self.pinned.update(members)


def _feature_width(program: Program, atom) -> int | None:
    shape = program.shapes.get(atom) if isinstance(atom, int) else np.shape(atom.value)
    return shape[-1] if shape else None


def _per_feature(program: Program, atom, width: int) -> bool:
    """A non-followed operand an elementwise op may meet without mixing features: a scalar, a
    constant or parameter (a bias, a BatchNorm scale), or a size-1 feature axis."""
    if isinstance(atom, Const) or atom not in program.dynamic:
        return True
    shape = program.shapes[atom]
    return not shape or shape[-1] == 1


def coupled_groups(program: Program, outputs: dict[str, tuple[int, int]]) -> list[CoupledGroup]:
    """The groups of ≥ 2 removable-together output units.

    Args:
      program: the model's traced computation.
      outputs: ``{layer: (variable, number of units)}``: each map's contraction output whose
        last axis is its units (maps with several output axes are not followed).
    """
    groups = _Groups()
    starts = {var: name for name, (var, _) in outputs.items()}
    tags: dict[int, list[frozenset]] = {}

    def pin(atom):
        if isinstance(atom, int) and atom in tags:
            for members in tags[atom]:
                groups.pin(members)

    for op in program.ops:
        followed = [a for a in op.inputs if isinstance(a, int) and a in tags]
        out = op.outputs[0] if op.outputs else None
        if out in starts:
            name = starts[out]
            tags[out] = [frozenset({(name, j)}) for j in range(outputs[name][1])]
            continue
        if not followed:
            continue
        if op.name in ("dot_general", "conv_general_dilated") and not any(
                isinstance(a, int) and a in program.dynamic and a not in tags
                for a in op.inputs):
            continue  # a map reading followed features (a parameter kernel): it reads, no more
        width = _feature_width(program, out) if out is not None else None
        result = None
        if op.name in ELEMENTWISE and width is not None:
            result = _elementwise(program, op, tags, width, groups)
        elif op.name in _RULES and len(followed) == 1 and len(op.inputs) >= 1:
            result = _RULES[op.name](program, op, tags[op.inputs[0]])
        elif op.name == "concatenate":
            result = _concatenate(program, op, tags)
        if result is None:
            for atom in followed:
                pin(atom)
        else:
            tags[out] = result
    for atom in program.outputs:
        pin(atom)
    components: dict = {}
    for member in list(groups.parent):
        components.setdefault(groups.find(member), []).append(member)
    found = []
    for members in components.values():
        if len(members) >= 2 and not groups.pinned.intersection(members):
            found.append(CoupledGroup(tuple(sorted(members))))
    return sorted(found, key=lambda g: g.members)


def _elementwise(program, op, tags, width, groups):
    result = [frozenset()] * width
    for atom in op.inputs:
        if isinstance(atom, int) and atom in tags:
            features = tags[atom]
            if len(features) != width:
                return None
            result = [a | b for a, b in zip(result, features)]
        elif not _per_feature(program, atom, width):
            return None  # a value that is not followed: its features are not known
    for members in result:
        if len(members) > 1:
            groups.union(members)
    return result


def _keeps_last(program, op, features):
    shape_in = program.shapes[op.inputs[0]]
    shape_out = program.shapes[op.outputs[0]]
    if not shape_in or not shape_out or shape_in[-1] != shape_out[-1]:
        return None
    if op.name == "transpose" and op.params["permutation"][-1] != len(shape_in) - 1:
        return None
    if op.name == "broadcast_in_dim":
        dims = op.params["broadcast_dimensions"]
        if not dims or dims[-1] != len(shape_out) - 1:
            return None
    if op.name in _REDUCE and len(shape_in) - 1 in op.params["axes"]:
        return None
    if op.name.startswith("reduce_window") and op.params["window_dimensions"][-1] != 1:
        return None
    if op.name == "reshape" and np.prod(shape_in[:-1]) != np.prod(shape_out[:-1]):
        return None
    return features


def _pad(program, op, features):
    config = [tuple(c) for c in op.params["padding_config"]]
    low, high, interior = config[-1]
    if interior or low < 0 or high < 0:
        return None
    return [frozenset()] * low + list(features) + [frozenset()] * high


def _concatenate(program, op, tags):
    ndim = len(program.shapes[op.outputs[0]])
    if op.params["dimension"] != ndim - 1:
        return None
    result = []
    for atom in op.inputs:
        if isinstance(atom, int) and atom in tags:
            result.extend(tags[atom])
        else:
            result.extend([frozenset()] * _feature_width(program, atom))
    return result


_RULES = {name: _keeps_last for name in (
    "transpose", "broadcast_in_dim", "reshape", "squeeze", "reduce_sum", "reduce_max",
    "reduce_min", "reduce_window_sum", "reduce_window_max", "slice", "copy", "convert")}
_RULES["pad"] = _pad
