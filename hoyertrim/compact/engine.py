"""Compaction: a pruned model made physically smaller, with the same outputs.

Works on the model's computation (`inspection.program`), so a linen module, an NNX module and a
plain function ``apply(params, x)`` are compacted alike. Every linear map of the model
(`inspection.linear_maps`) becomes a smaller contraction:

- **output units** whose kernel column is all zero are not computed: such a unit outputs the
  same value for every input (0, then its bias through what follows);
- **output units nobody reads** — every map they reach has all-zero rows for them — are not
  computed either;
- **input features** the map's kernel never reads are not gathered, and the features of a
  producer's removed units are not multiplied: their constant value times the kernel rows is
  added to the map's output as a bias.

Between a producer and its consumers the activations stay *narrow*: the model's own operations
run on the kept features only, while the removed ones are tracked as one constant per feature
(an exact value, or "unknown" for units nobody reads). Operations that act feature by feature —
activations (ReLU, gelu written inline), per-channel affine steps (inference BatchNorm, a bias,
a scale), pooling over positions, a flatten, a transpose that keeps the feature axis last,
zero channels padded on (a ResNet's option-A shortcut) — run narrow. A residual add of two
narrow branches computes the features either keeps: a channel coupled across residual adds
(DepGraph's group: the stem and every block writing the stream) goes only when it is dead in
every member. Any other operation that meets a narrow value (an add with a full branch, a
LayerNorm's reduction over features, attention's head split, a reversal) first gets it back at
full width, its removed features filled with their constants, so the result is exact wherever
the computation goes; a unit whose value is unknown is removed only when the analysis shows it
never comes back to full width. A convolution with padding sees a constant feature as zero at
the borders: what the constants add to its output is computed once per output position and
added as a (H', W', M') shift.

Only the kernels change: every other parameter is stored and used as it is. A map's input axis
must be the data's last axis and its output units the output's last axis for the map to shrink
(Dense, ``nnx.Linear``, channels-last convolutions, single-axis ``Einsum``). Multi-axis
projections shrink by whole attention heads (`hoyertrim.compact.heads`): a head no output
projection reads is not computed by its q/k/v projections, and the attention between runs on
the kept heads only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hoyertrim.compact.heads import Heads, contraction_axes, head_groups, heads_op
from hoyertrim.inspection.computation import as_computation, split_variables
from hoyertrim.inspection.linear_maps import locate
from hoyertrim.inspection.program import ELEMENTWISE, Const, Op, Program, bind_op
from hoyertrim.trees import layer_name, path_keys

__all__ = ["CompactLayer", "CompactModel", "compact", "load_compact", "save_compact"]

@dataclasses.dataclass
class CompactLayer:
    """One linear map's compact contraction.

    Attributes:
      kernel: the smaller kernel, in the layout the model's contraction consumes it (Dense:
        (N', M'); a channels-last conv: its own window/in/out layout with I' and O' channels).
      shift: (M',) constants of removed input features times their kernel rows, added to the
        contraction's output — (H', W', M') for a padded convolution, which sees the
        constants as zeros at the borders; None when nothing was folded.
      input_index: which features of the data's last axis the kernel's rows are (None: all).
      output_index: which of the map's output units are computed (None: all).
      output_fill: (M,) what a removed output unit holds before the bias (0.0; NaN where no one
        reads it).
      width: M, the map's original number of output units (or of features of a full input).
      heads: the attention heads the kernel keeps along ``head_axis`` (`heads.head_groups`: a
        q/k/v projection's first free axis, an output projection's first contracted axis);
        None: all.
    """

    kernel: np.ndarray
    shift: np.ndarray | None
    input_index: np.ndarray | None
    output_index: np.ndarray | None
    output_fill: np.ndarray | None
    width: int
    heads: np.ndarray | None = None
    head_axis: int | None = None


@dataclasses.dataclass(frozen=True)
class _Narrow:
    """A value stored only at features ``keep`` of its last axis (full width ``width``); every
    removed feature j holds ``fill[j]`` at every position of the other axes. ``unknown[j]``: j's
    value is not known (a unit nobody reads). ``sources``: the maps whose removed units these
    are; ``units[j]``: the source unit of feature j (a single source only, else None)."""

    array: Any
    keep: np.ndarray
    fill: Any
    unknown: np.ndarray
    sources: frozenset
    units: np.ndarray | None

    @property
    def width(self) -> int:
        return len(self.unknown)


class _Absent:
    """A compacted kernel's original leaf: not stored, never read."""


_ABSENT = _Absent()


@dataclasses.dataclass
class _Events:
    """What a planning run saw, to decide which unread units may go."""

    widened: set = dataclasses.field(default_factory=set)  # sources brought back to full width
    unread: dict = dataclasses.field(default_factory=dict)  # source -> units no consumer reads
    heads_failed: bool = False  # a value with removed heads met what needs them


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def _widen(value: _Narrow, keep: np.ndarray | None = None):
    """The narrow value at full width (or at features ``keep`` ⊇ its own), removed features
    filled with their constants."""
    dropped = np.setdiff1d(np.arange(value.width), value.keep)
    order = np.concatenate([value.keep, dropped])
    fill = jnp.asarray(value.fill, value.array.dtype)[dropped]
    parts = [value.array, jnp.broadcast_to(fill, value.array.shape[:-1] + (len(dropped),))]
    full = jnp.concatenate(parts, axis=-1)
    position = np.empty(value.width, int)
    position[order] = np.arange(value.width)
    wanted = np.arange(value.width) if keep is None else keep
    return _take_features(full, position[wanted])


class _Interpreter:
    """Runs a traced model with compacted maps (``plans``), deciding the plans first when
    ``planning`` (then every input is concrete and the full kernels are present)."""

    def __init__(self, program: Program, names: list[str], data_inputs: set[int],
                 plans: dict[str, CompactLayer], planning: dict | None = None,
                 probe: bool = False, heads: dict | None = None):
        self.program = program
        self.plans = plans
        self.planning = planning  # {layer: (removed units, unknown units)} while planning
        # {layer: (kept heads, kernel's head axis)}: planned, or read from the plans.
        self.heads = dict(heads or {}) if planning is not None else {
            path: (plan.heads, plan.head_axis) for path, plan in plans.items()
            if plan.heads is not None}
        # Every map's output tracked as a narrow value keeping all its units, so that what its
        # consumers never read is seen even of a producer with no dead unit.
        self.probe = probe
        self.events = _Events()
        located, _ = locate(program, len(names))
        self.maps = {where.op: (names[leaf], where) for leaf, where in located.items()
                     if names[leaf] in plans or planning is not None}
        self.dynamic = set(data_inputs)
        for op in program.ops:
            if any(isinstance(a, int) and a in self.dynamic for a in op.inputs):
                self.dynamic.update(op.outputs)
        self._per_feature: dict[int, bool] = {}

    def run(self, inputs: list):
        env = self._env = dict(zip(self.program.inputs, inputs))

        def read(atom):
            return atom.value if isinstance(atom, Const) else env[atom]

        for op in self.program.ops:
            values = [read(a) for a in op.inputs]
            if op in self.maps:
                results = [self._map(op, values)]
            elif any(v is _ABSENT for v in values):
                results = [_ABSENT] * len(op.outputs)  # a compacted kernel's layout ops
            elif any(isinstance(v, Heads) for v in values):
                results = self._heads_op(op, values)
            elif any(isinstance(v, _Narrow) for v in values):
                results = self._narrow_op(op, values)
            else:
                results = bind_op(op, values)
            env.update(zip(op.outputs, results))
        return [self._full(read(a)) for a in self.program.outputs]

    # -- operations on narrow values ---------------------------------------------------------

    def _full(self, value):
        if isinstance(value, _Narrow):
            self.events.widened.update(value.sources)
            return _widen(value)
        if isinstance(value, Heads):
            # The removed heads were never computed: the plan that removed them is rejected
            # (`compact` plans again keeping every head); zeros keep the shapes going.
            self.events.heads_failed = True
            full = list(np.shape(value.array))
            full[value.axis] = value.width
            return jnp.zeros(full, value.array.dtype).at[
                (slice(None),) * value.axis + (value.keep,)].set(value.array)
        return value

    def _heads_op(self, op: Op, values: list) -> list:
        if not any(isinstance(v, _Narrow) for v in values):
            result = heads_op(self.program, op, values)
            if result is not None:
                return result
        return self._narrow_op(op, [self._full(v) for v in values])

    def _narrow_op(self, op: Op, values: list) -> list:
        rule = getattr(self, f"_rule_{op.name}", None)
        if op.name in ELEMENTWISE:
            result = self._elementwise(op, values)
        elif rule is not None:
            result = rule(op, values)
        else:
            result = None
        if result is None:
            return bind_op(op, [self._full(v) for v in values])
        return [result]

    def _elementwise(self, op: Op, values: list):
        narrow = [v for v in values if isinstance(v, _Narrow)]
        first = narrow[0]
        if any(v.width != first.width for v in narrow):
            return None
        if any(not np.array_equal(v.keep, first.keep) for v in narrow):
            # Narrow operands that keep different features (a residual add of two narrow
            # branches): the features either keeps are computed, each operand's other ones
            # filled in with their constants; a feature removed in every operand stays removed.
            # This is how a channel coupled across residual adds (DepGraph's group) goes: only
            # when it is dead in every branch that writes it.
            keep = functools.reduce(np.union1d, [v.keep for v in narrow])
            values = [self._widened_to(v, keep) if isinstance(v, _Narrow) else v
                      for v in values]
            narrow = [v for v in values if isinstance(v, _Narrow)]
            first = narrow[0]
        out_shape = self.program.shapes[op.outputs[0]]
        arrays, fills = [], []
        for atom, value in zip(op.inputs, values):
            if isinstance(value, _Narrow):
                arrays.append(value.array)
                fills.append(jnp.asarray(value.fill, value.array.dtype))
            elif math.prod(np.shape(value)) == 1:  # a scalar, possibly of shape (1, …, 1)
                arrays.append(value)
                fills.append(jnp.reshape(value, ()))
            elif (np.ndim(value) == len(out_shape) and np.shape(value)[-1] == first.width
                  and self._varies_by_feature(atom)):
                arrays.append(jnp.take(value, first.keep, axis=-1))
                fills.append(jnp.asarray(value)[(0,) * (len(out_shape) - 1)])
            else:
                return None  # a data-dependent full operand (e.g. a residual branch)
        array = bind_op(op, arrays)[0]
        fill = bind_op(op, fills)[0]
        unknown = np.logical_or.reduce([v.unknown for v in narrow])
        sources = frozenset().union(*(v.sources for v in narrow))
        units = first.units if all(v.units is first.units for v in narrow) else None
        return _Narrow(array, first.keep, fill, unknown, sources,
                       units if len(sources) == 1 else None)

    def _widened_to(self, value: _Narrow, keep: np.ndarray) -> _Narrow:
        """The value computed at features ``keep`` ⊇ its own (constants filled in)."""
        if np.any(value.unknown[np.setdiff1d(keep, value.keep)]):
            self.events.widened.update(value.sources)  # an unknown value is used
        unknown = value.unknown.copy()
        unknown[keep] = False
        return _Narrow(_widen(value, keep), keep, value.fill, unknown, value.sources,
                       value.units)

    def _varies_by_feature(self, atom) -> bool:
        """Whether a full-shape operand that does not depend on the data is constant along
        every axis but the last (a bias, a BatchNorm scale broadcast over positions)."""
        if isinstance(atom, Const):
            value = np.asarray(atom.value)
            return bool(np.all(value == value[(slice(0, 1),) * (value.ndim - 1)]))
        if atom in self.dynamic:
            return False
        if atom not in self._per_feature:
            shape = self.program.shapes[atom]
            op = self.program.producer.get(atom)
            if math.prod(shape[:-1]) == 1:
                answer = True
            elif op is None:
                answer = False
            elif op.name == "broadcast_in_dim":
                dims = op.params["broadcast_dimensions"]
                source = self.program.shapes.get(op.inputs[0], np.shape(
                    getattr(op.inputs[0], "value", 0)))
                answer = all(source[i] == 1 or (d == len(shape) - 1 and shape[d] == source[i])
                             for i, d in enumerate(dims))
            elif op.name in ELEMENTWISE:
                answer = all(not isinstance(a, int) and np.ndim(a.value) == 0
                             or self.program.shapes.get(a) == () or self._varies_by_feature(a)
                             for a in op.inputs)
            else:
                answer = False
            self._per_feature[atom] = answer
        return self._per_feature[atom]

    def _relabel(self, value: _Narrow, array, fill=None) -> _Narrow:
        """The same features, computed further (``array``; ``fill``: the new constants)."""
        return _Narrow(array, value.keep, value.fill if fill is None else fill, value.unknown,
                       value.sources, value.units)

    def _rule_transpose(self, op, values):
        (value,) = values
        perm = tuple(op.params["permutation"])
        if perm[-1] != len(perm) - 1:
            return None
        return self._relabel(value, jax.lax.transpose(value.array, perm))

    def _rule_reshape(self, op, values):
        value = values[0]
        if len(values) != 1 or op.params.get("dimensions") is not None:
            return None
        old = self.program.shapes[op.inputs[0]]
        new = tuple(op.params["new_sizes"])
        if new[-1] == old[-1] and math.prod(new[:-1]) == math.prod(old[:-1]):
            shape = new[:-1] + (len(value.keep),)
            return self._relabel(value, jnp.reshape(value.array, shape))
        # A flatten: trailing axes (…, positions, features) merged into the last one.
        for start in range(len(old) - 1, -1, -1):
            if math.prod(old[start:]) == new[-1] and tuple(old[:start]) == new[:-1]:
                break
        else:
            return None
        repeat = math.prod(old[start:-1])
        width = value.width
        keep = (np.arange(repeat)[:, None] * width + value.keep[None, :]).reshape(-1)
        array = jnp.reshape(value.array, new[:-1] + (repeat * len(value.keep),))
        fill = jnp.tile(jnp.asarray(value.fill), repeat)
        units = None if value.units is None else np.tile(value.units, repeat)
        return _Narrow(array, keep, fill, np.tile(value.unknown, repeat), value.sources, units)

    def _reduce(self, op, values, scale: bool):
        (value,) = values
        axes = tuple(op.params["axes"])
        ndim = len(self.program.shapes[op.inputs[0]])
        if ndim - 1 in axes:
            return None
        array = bind_op(op, [value.array])[0]
        count = math.prod(self.program.shapes[op.inputs[0]][a] for a in axes)
        fill = jnp.asarray(value.fill) * count if scale else value.fill
        return self._relabel(value, array, fill=fill)

    def _rule_reduce_sum(self, op, values):
        return self._reduce(op, values, scale=True)

    def _rule_reduce_max(self, op, values):
        return self._reduce(op, values, scale=False)

    def _rule_reduce_min(self, op, values):
        return self._reduce(op, values, scale=False)

    def _window(self, op, values, scale: bool):
        (value,) = values
        window = tuple(op.params["window_dimensions"])
        padding = tuple(tuple(p) for p in op.params["padding"])
        if (window[-1] != 1 or op.params["window_strides"][-1] != 1
                or any(d != 1 for d in op.params.get("base_dilation", (1,))[-1:])
                or padding[-1] != (0, 0)):
            return None
        if scale and any(p != (0, 0) for p in padding):
            return None  # a padded sum sees fewer copies of the constant at the borders
        array = bind_op(op, [value.array])[0]
        fill = jnp.asarray(value.fill) * math.prod(window) if scale else value.fill
        return self._relabel(value, array, fill=fill)

    def _rule_reduce_window_sum(self, op, values):
        return self._window(op, values, scale=True)

    def _rule_reduce_window_max(self, op, values):
        return self._window(op, values, scale=False)

    def _rule_broadcast_in_dim(self, op, values):
        (value,) = values
        shape = tuple(op.params["shape"])
        dims = tuple(op.params["broadcast_dimensions"])
        if not dims or dims[-1] != len(shape) - 1 or shape[-1] != value.width:
            return None
        params = dict(op.params, shape=shape[:-1] + (len(value.keep),))
        return self._relabel(value, bind_op(dataclasses.replace(op, params=params),
                                          [value.array])[0])

    def _rule_slice(self, op, values):
        (value,) = values
        full = self.program.shapes[op.inputs[0]]
        start, limit = op.params["start_indices"], op.params["limit_indices"]
        strides = op.params.get("strides") or (1,) * len(full)
        if start[-1] != 0 or limit[-1] != full[-1] or strides[-1] != 1:
            return None
        params = dict(op.params, limit_indices=tuple(limit[:-1]) + (len(value.keep),))
        return self._relabel(value, bind_op(dataclasses.replace(op, params=params),
                                          [value.array])[0])

    def _rule_concatenate(self, op, values):
        """Along the features (image patches: one block of channels per window tap)."""
        ndim = len(self.program.shapes[op.outputs[0]])
        if op.params["dimension"] != ndim - 1:
            return None
        parts = [v if isinstance(v, _Narrow) else _Narrow(
            v, np.arange(np.shape(v)[-1]), jnp.zeros(np.shape(v)[-1], v.dtype),
            np.zeros(np.shape(v)[-1], bool), frozenset(), None) for v in values]
        offsets = np.cumsum([0] + [p.width for p in parts])[:-1]
        keep = np.concatenate([p.keep + o for p, o in zip(parts, offsets)])
        sources = frozenset().union(*(p.sources for p in parts))
        units = None
        if len(sources) == 1 and all(p.units is not None for p in parts):
            units = np.concatenate([p.units for p in parts])
        dtype = parts[0].array.dtype
        return _Narrow(jnp.concatenate([p.array for p in parts], axis=-1), keep,
                       jnp.concatenate([jnp.asarray(p.fill, dtype) for p in parts]),
                       np.concatenate([p.unknown for p in parts]), sources, units)

    def _rule_pad(self, op, values):
        """Zero channels added on the feature axis only (a ResNet's option-A shortcut): they
        are features removed from the start, with the padding value as their constant."""
        value, padding_value = values
        config = [tuple(c) for c in op.params["padding_config"]]
        low, high, interior = config[-1]
        if (isinstance(padding_value, _Narrow) or not isinstance(op.inputs[1], Const)
                or any(c != (0, 0, 0) for c in config[:-1]) or interior != 0
                or low < 0 or high < 0):
            return None
        pad = np.asarray(op.inputs[1].value)
        fill = jnp.concatenate([jnp.full(low, pad, value.array.dtype),
                                jnp.asarray(value.fill, value.array.dtype),
                                jnp.full(high, pad, value.array.dtype)])
        unknown = np.concatenate([np.zeros(low, bool), value.unknown, np.zeros(high, bool)])
        return _Narrow(value.array, value.keep + low, fill, unknown, value.sources, None)

    def _rule_squeeze(self, op, values):
        (value,) = values
        ndim = len(self.program.shapes[op.inputs[0]])
        if ndim - 1 in [d % ndim for d in op.params["dimensions"]]:
            return None
        return self._relabel(value, bind_op(op, [value.array])[0])

    # -- the linear maps ---------------------------------------------------------------------

    def _map(self, op: Op, values: list):
        path, where = self.maps[op]
        position = 0 if op.inputs[0] != where.data else 1  # the kernel's operand
        data, operand = values[1 - position], values[position]
        if path in self.heads:
            result = self._head_map(op, path, position, data, operand)
            if result is not None:
                return result
        if isinstance(data, Heads):
            data = self._full(data)
        if self.planning is not None and path not in self.plans:
            self.plans[path] = self._decide(op, path, where, position, data, np.asarray(operand))
        plan = self.plans[path]
        if isinstance(data, _Narrow):
            if plan.input_index is None:
                data = self._full(data)
            elif np.array_equal(plan.input_index, data.keep):
                data = data.array
            else:  # constants that a padded convolution must see: kept as inputs
                self.events.widened.update(data.sources)
                data = _widen(data, plan.input_index)
        elif plan.input_index is not None:
            data = _take_features(data, plan.input_index)
        patches = self._patch_source(op, position, plan) if self.planning is None else None
        if patches is not None:  # image patches @ kernel: one convolution of their source
            source, window = patches
            kernel = np.asarray(plan.kernel).reshape(*window, -1, plan.kernel.shape[-1])
            out = _valid_conv(source, kernel)
        else:
            out = _contract(op, data, plan.kernel, position)
        if plan.shift is not None:
            out = out + jnp.asarray(plan.shift, out.dtype)
        if plan.output_index is None:
            if self.probe and _axes(op, position, self.program)[1] is not None \
                    and np.shape(out)[-1] == plan.width:
                return _Narrow(out, np.arange(plan.width), np.zeros(plan.width),
                               np.zeros(plan.width, bool), frozenset([path]),
                               np.arange(plan.width))
            return out
        unknown = np.isnan(plan.output_fill)
        return _Narrow(out, plan.output_index, np.nan_to_num(plan.output_fill), unknown,
                       frozenset([path]), np.arange(plan.width))

    def _head_map(self, op: Op, path: str, position: int, data, operand):
        """A q/k/v projection computing the kept heads only (as `Heads`), or an output
        projection reading them; None (and the plan rejected) when the value is not what the
        head group expects."""
        keep, axis = self.heads[path]
        kernel_c, data_c = contraction_axes(op, position)
        consumer = axis in kernel_c
        if self.planning is not None and path not in self.plans:
            operand = np.asarray(operand)
            if consumer:
                removed = np.setdiff1d(np.arange(operand.shape[axis]), keep)
                if np.any(np.take(operand, removed, axis) != 0):
                    self.events.heads_failed = True
                    return None
            kernel, input_index = np.take(operand, keep, axis), None
            in_axis = None if consumer else _axes(op, position, self.program)[0]
            if in_axis is not None:  # the features a q/k/v projection never reads
                rows = np.any(np.moveaxis(kernel, in_axis, 0).reshape(
                    kernel.shape[in_axis], -1) != 0, axis=1)
                if not rows.all():
                    input_index = _read_rows(rows)
                    kernel = np.take(kernel, input_index, in_axis)
            self.plans[path] = CompactLayer(
                kernel=kernel, shift=None, input_index=input_index, output_index=None,
                output_fill=None, width=_num_outputs(op, position, operand), heads=keep,
                head_axis=axis)
        plan = self.plans[path]
        kernel = jnp.asarray(plan.kernel)
        if consumer:
            data_axis = data_c[kernel_c.index(axis)]
            if not (isinstance(data, Heads) and data.axis == data_axis
                    and np.array_equal(data.keep, keep)):
                self.events.heads_failed = True
                return None
            return bind_op(op, [kernel, data.array] if position == 0 else [data.array, kernel])[0]
        data = self._full(data)
        if plan.input_index is not None:
            data = _take_features(data, plan.input_index)
        free = [a for a in range(np.ndim(kernel)) if a not in kernel_c]
        data_free = np.ndim(data) - len(data_c)
        out_axis = (data_free if position == 1 else 0) + free.index(axis)
        out = bind_op(op, [kernel, data] if position == 0 else [data, kernel])[0]
        atom = op.inputs[position]
        full = self.program.shapes[atom] if isinstance(atom, int) else np.shape(atom.value)
        return Heads(out, out_axis, keep, int(full[axis]))

    def _patch_source(self, op: Op, position: int, plan: CompactLayer):
        """(source, (kh, kw)) when the map's data operand is the stride-1 VALID image patches
        of one channels-last value — the concatenation, along features, of its kh·kw shifted
        windows in row-major order (the zoo's ``PatchConv``) — and the compact kernel's rows
        are exactly those patches' features; else None."""
        data = op.inputs[1 - position]
        concat = self.program.producer.get(data) if isinstance(data, int) else None
        if (position != 1 or np.ndim(plan.kernel) != 2 or concat is None
                or concat.name != "concatenate"
                or concat.params["dimension"] != len(self.program.shapes[data]) - 1):
            return None
        slices = [self.program.producer.get(a) if isinstance(a, int) else None
                  for a in concat.inputs]
        if any(s is None or s.name != "slice" for s in slices):
            return None
        source = slices[0].inputs[0]
        shape = self.program.shapes.get(source, ())
        if len(shape) != 4 or any(s.inputs[0] != source or any(
                d not in (None, 1) for d in (s.params.get("strides") or ())) for s in slices):
            return None
        starts = [tuple(s.params["start_indices"]) for s in slices]
        out_shape = self.program.shapes[slices[0].outputs[0]]
        kh, kw = shape[1] - out_shape[1] + 1, shape[2] - out_shape[2] + 1
        expected = [(0, i, j, 0) for i in range(kh) for j in range(kw)]
        if starts != expected or any(self.program.shapes[s.outputs[0]] != out_shape
                                     for s in slices) or out_shape[3] != shape[3]:
            return None
        value = self._env[source]
        if isinstance(value, _Narrow):
            taps = (np.arange(kh * kw)[:, None] * value.width + value.keep[None, :]).ravel()
            if plan.input_index is None or not np.array_equal(plan.input_index, taps):
                return None
            return value.array, (kh, kw)
        return (value, (kh, kw)) if plan.input_index is None else None

    def _decide(self, op: Op, path: str, where, position: int, data, operand) -> CompactLayer:
        """A map's plan, from its full kernel (as the contraction consumes it) and its input."""
        axes = _axes(op, position, self.program)
        in_axis, out_axis = axes
        input_index, shift = None, None
        width_in = self.program.shapes[where.data][-1]
        if in_axis is not None:
            rows = np.any(np.moveaxis(operand, in_axis, 0).reshape(width_in, -1) != 0, axis=1)
            if isinstance(data, _Narrow) and out_axis is not None:
                input_index, shift = self._consume(op, data, operand, in_axis, out_axis,
                                                   rows)
            else:
                if isinstance(data, _Narrow):  # a folded bias needs the units last: filled in
                    self.events.widened.update(data.sources)
                if not rows.all():
                    input_index = _read_rows(rows)
        elif isinstance(data, _Narrow):
            self.events.widened.update(data.sources)
        kernel = operand if input_index is None else np.take(operand, input_index, in_axis)
        output_index, output_fill = None, None
        removed, unknown = self.planning.get(path, (np.array([], int), np.array([], int)))
        width = _num_outputs(op, position, operand)
        if out_axis is not None and len(removed) and len(removed) < width:
            output_index = np.setdiff1d(np.arange(width), removed)
            kernel = np.take(kernel, output_index, out_axis)
            output_fill = np.zeros(width)
            output_fill[unknown] = np.nan
            if shift is not None:
                shift = shift[..., output_index]
        return CompactLayer(kernel=kernel, shift=shift, input_index=input_index,
                            output_index=output_index, output_fill=output_fill, width=width)

    def _padded_constants(self, op: Op, data: _Narrow, operand, constant, fill):
        """(H', W', M) what the constant features ``constant`` add to a padded convolution's
        output at each position (None: not a channels-last convolution of the data)."""
        if not _channels_last(op):
            return None
        shape = (1,) + tuple(self.program.shapes[op.inputs[0]][1:])
        image = np.zeros(shape, np.float64)
        image[..., constant] = fill[constant]
        (out,) = bind_op(op, [jnp.asarray(image, jnp.float32), jnp.asarray(operand, jnp.float32)])
        return np.asarray(out, np.float64)[0]

    def _consume(self, op, data: _Narrow, operand, in_axis, out_axis, rows):
        """(input features, bias shift) of a map reading a narrow value."""
        dropped = np.setdiff1d(np.arange(data.width), data.keep)
        fill = np.asarray(data.fill, np.float64)
        if data.units is not None and len(data.sources) == 1:
            (source,) = data.sources
            unread = set(np.unique(data.units[data.keep][~rows[data.keep]]).tolist())
            unread -= set(np.unique(data.units[data.keep][rows[data.keep]]).tolist())
            previous = self.events.unread.get(source)
            self.events.unread[source] = unread if previous is None else previous & unread
        else:
            self.events.widened.update(data.sources)
        if np.any(data.unknown[dropped] & rows[dropped]):
            self.events.widened.update(data.sources)  # an unknown value is read: not removable
        constant = dropped[rows[dropped] & ~data.unknown[dropped] & (fill[dropped] != 0)]
        if len(constant) == 0:
            return data.keep, None
        padded = op.name == "conv_general_dilated" and not _valid(op)
        if padded:
            # The constants' contribution depends on the position (the padding is 0): one
            # convolution of a constant image gives it, per output position.
            shift = self._padded_constants(op, data, operand, constant, fill)
            if shift is None:
                return np.union1d(data.keep, constant), None
            return data.keep, shift
        # Each output position multiplies every constant feature by its rows (a VALID window
        # lies inside the input, so a convolution sees the constant through every tap).
        taken = np.moveaxis(np.take(operand, constant, in_axis), [in_axis, out_axis], [0, -1])
        per_feature = taken.reshape(len(constant), -1, taken.shape[-1]).sum(axis=1)
        shift = fill[constant] @ per_feature.astype(np.float64)
        return data.keep, shift


def _take_features(x, index: np.ndarray):
    """``x[..., index]``: a slice where the features are one contiguous run; else a product with
    a 0/1 selection matrix. XLA:CPU lowers a gather along the feature axis of an activation with
    relayouts that cost more than the convolutions they feed (a compact ResNet-20 ran no faster
    than the dense one); the selection matmul is exact (each output is one input times 1)."""
    index = np.asarray(index)
    if index.size and np.array_equal(index, np.arange(index[0], index[0] + index.size)):
        return x[..., int(index[0]):int(index[0]) + index.size]
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.take(x, index, axis=-1)
    select = np.zeros((np.shape(x)[-1], index.size), np.dtype(x.dtype))
    select[index, np.arange(index.size)] = 1
    return jnp.matmul(x, select, precision=jax.lax.Precision.HIGHEST)


def _read_rows(rows: np.ndarray) -> np.ndarray:
    """The input features a kernel reads (one, when it reads none: the contraction needs one)."""
    return np.flatnonzero(rows) if rows.any() else np.array([0])


def _channels_last(op: Op) -> bool:
    numbers = op.params["dimension_numbers"]
    ndim = len(numbers.lhs_spec)
    return numbers.lhs_spec[1] == ndim - 1 and numbers.out_spec[1] == ndim - 1


def _axes(op: Op, position: int, program: Program) -> tuple[int | None, int | None]:
    """(the kernel operand's axis of input features, of output units): each only when it maps to
    the data's last axis / the output's last axis (None otherwise)."""
    if op.name == "dot_general":
        (lhs_c, rhs_c), _ = op.params["dimension_numbers"]
        param_c, data_c = (lhs_c, rhs_c) if position == 0 else (rhs_c, lhs_c)
        data_ndim = len(program.shapes[op.inputs[1 - position]])
        kernel_ndim = len(program.shapes[op.inputs[position]]) if isinstance(
            op.inputs[position], int) else np.ndim(op.inputs[position].value)
        free = [a for a in range(kernel_ndim) if a not in tuple(param_c)]
        if position != 1:
            return None, None
        in_axis = param_c[0] if tuple(data_c) == (data_ndim - 1,) and len(param_c) == 1 else None
        out_axis = free[0] if len(free) == 1 else None
        return in_axis, out_axis
    dn = op.params["dimension_numbers"]
    if op.params.get("feature_group_count", 1) != 1 or position != 1:
        return None, None
    out_last = dn.out_spec[1] == len(dn.out_spec) - 1
    in_last = dn.lhs_spec[1] == len(dn.lhs_spec) - 1
    out_axis = dn.rhs_spec[0] if out_last else None
    return (dn.rhs_spec[1] if in_last and out_last else None), out_axis


def _num_outputs(op: Op, position: int, operand) -> int:
    """The map's output units: the kernel's free entries (a conv's output channels)."""
    if op.name == "conv_general_dilated":
        return int(operand.shape[op.params["dimension_numbers"].rhs_spec[0]])
    (lhs_c, rhs_c), _ = op.params["dimension_numbers"]
    contracted = set(lhs_c if position == 0 else rhs_c)
    return math.prod(n for a, n in enumerate(operand.shape) if a not in contracted)


def _valid(op: Op) -> bool:
    pads = np.asarray(op.params["padding"]).reshape(-1)
    return bool(np.all(pads == 0)) and all(d == 1 for d in op.params["lhs_dilation"])


def _contract(op: Op, data, kernel, position: int):
    if op.name == "conv_general_dilated" and _row_matmul_applies(op, kernel, data):
        return _conv_as_row_matmul(op, kernel, data)
    operands = [kernel, data] if position == 0 else [data, kernel]
    return bind_op(op, operands)[0]


# Largest row-Toeplitz matrix (entries) `_conv_as_row_matmul` builds.
_ROW_MATMUL_MAX_ENTRIES = 1 << 20
_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _valid_conv(x, kernel):
    """A stride-1 VALID convolution of NHWC ``x`` with an HWIO ``kernel``: as one row-Toeplitz
    matmul where that is fast (`_row_matmul_applies`), else XLA's convolution."""
    op = Op(jax.lax.conv_general_dilated_p, [], [], dict(
        window_strides=(1, 1), padding=((0, 0), (0, 0)), lhs_dilation=(1, 1),
        rhs_dilation=(1, 1), dimension_numbers=jax.lax.ConvDimensionNumbers(*_NHWC),
        feature_group_count=1, batch_group_count=1), ())
    if _row_matmul_applies(op, kernel, x):
        return _conv_as_row_matmul(op, kernel, x)
    return jax.lax.conv_general_dilated(x, jnp.asarray(kernel, x.dtype), (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _row_matmul_applies(op: Op, kernel, x) -> bool:
    """Whether a conv runs as one matmul per output row: on CPU, for plain stride-1 2-D
    channels-last convs with few input channels (≤ 8), where XLA's CPU convolution is slow (a
    1-channel LeNet conv takes about as long with 7 filters as with 32) and the Toeplitz matrix
    stays small."""
    p = op.params
    dn = p["dimension_numbers"]
    if jax.default_backend() != "cpu" or np.ndim(kernel) != 4 or (
            tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) != _NHWC:
        return False
    if (any(s != 1 for s in p["window_strides"]) or any(d != 1 for d in p["lhs_dilation"])
            or any(d != 1 for d in p["rhs_dilation"]) or p["feature_group_count"] != 1
            or p["batch_group_count"] != 1 or kernel.shape[2] > 8):
        return False
    kh, kw, cin, cout = kernel.shape
    (top, bottom), (left, right) = p["padding"]
    if min(top, bottom, left, right) < 0:
        return False
    width = x.shape[2] + left + right
    return kh * width * cin * (width - kw + 1) * cout <= _ROW_MATMUL_MAX_ENTRIES


def _conv_as_row_matmul(op: Op, kernel, x):
    """A stride-1 2-D convolution as ``rows @ T``: each output row gathers the ``kh`` input rows
    it reads, (N·H', kh·W·C), and T (kh·W·C, W'·O) is the kernel laid out as a block-Toeplitz
    matrix, so the whole layer is one dense matmul. Same result as ``lax.conv`` up to float
    summation order."""
    kh, kw, cin, cout = kernel.shape
    (top, bottom), (left, right) = op.params["padding"]
    x = jnp.pad(x, [(0, 0), (top, bottom), (left, right), (0, 0)])
    n, height, width, _ = x.shape
    out_h, out_w = height - kh + 1, width - kw + 1
    toeplitz = np.zeros((kh, width, cin, out_w, cout), np.asarray(kernel).dtype)
    kernel = np.asarray(kernel)
    for j in range(out_w):
        toeplitz[:, j:j + kw, :, j, :] = kernel
    rows = jnp.stack([x[:, a:a + out_h] for a in range(kh)], axis=2)  # (N, H', kh, W, C)
    out = rows.reshape(n * out_h, kh * width * cin) @ toeplitz.reshape(-1, out_w * cout)
    return out.reshape(n, out_h, out_w, cout)


# -- the model as a function of all its arrays ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Model:
    """A model as ``apply(state, x)`` over *all* its arrays (params and statistics)."""

    apply: Callable
    state: Any
    kind: str


def _as_model(model, variables, apply_kwargs: Mapping) -> _Model:
    if isinstance(model, nn.Module):
        if variables is None:
            raise ValueError("A linen model needs its variables (or params) to be compacted.")
        params, collections, _ = split_variables(flax.core.unfreeze(variables))
        return _Model(lambda v, x: model.apply(v, x, **apply_kwargs),
                      {"params": params, **collections}, "linen")
    if isinstance(model, nnx.Module):
        computation = as_computation(model, variables, apply_kwargs=apply_kwargs)
        view = computation.rebuild(computation.params)
        flags = {f: True for f in ("use_running_average", "deterministic")
                 if any(hasattr(m, f) for _, m in nnx.iter_modules(view))}
        graphdef, state = nnx.split(nnx.view(view, **flags) if flags else view)
        return _Model(lambda s, x: nnx.merge(graphdef, s)(x, **apply_kwargs), state, "nnx")
    if callable(model):
        if variables is None:
            raise ValueError("A plain function needs its params to be compacted.")
        return _Model(lambda p, x: model(p, x, **apply_kwargs), variables, "function")
    raise TypeError(f"Expected a flax.linen.Module, a flax.nnx.Module or a function "
                    f"apply(params, x); got {type(model).__name__}.")


def _as_kind(model) -> str:
    return "linen" if isinstance(model, nn.Module) else "nnx" if isinstance(
        model, nnx.Module) else "function"


def _names(structure, kind: str) -> list[str]:
    """Each leaf's layer name (`trees.layer_name`; a linen kernel's ``params/`` left out)."""
    tree = jax.tree.unflatten(structure, [0] * structure.num_leaves)
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = path_keys(path)
        if kind == "linen" and keys[:1] == ("params",):
            path = path[1:]
        names.append(layer_name(path))
    return names


def _trace(apply, abstract_state, x) -> Program:
    return Program(jax.make_jaxpr(apply)(abstract_state, x))


@dataclasses.dataclass
class CompactModel:
    """A compacted model: call ``apply(inputs)``; `weights` counts the kernel entries it stores.

    Attributes:
      model: the model definition (linen module, NNX module or function).
      layers: ``{layer name: CompactLayer}`` for every linear map of the model.
      stored: ``{leaf index: array}``: every other array of the model, as it was.
      structure, shapes: the treedef and shapes of all the model's arrays (to trace it).
      apply_kwargs: keyword arguments of every call.
    """

    model: Any
    layers: dict[str, CompactLayer]
    stored: dict[int, Any]
    structure: Any
    shapes: list
    apply_kwargs: dict
    _apply: Callable | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        if self._apply is None:
            template = None if isinstance(self.model, nnx.Module) else jax.tree.unflatten(
                self.structure, self.shapes)
            self._apply = _as_model(self.model, template, self.apply_kwargs).apply
        apply, names = self._apply, _names(self.structure, _as_kind(self.model))
        layers, structure, shapes = self.layers, self.structure, self.shapes

        # The stored arrays enter the program as constants, so XLA folds what depends on them
        # alone (a bias broadcast and narrowed, a BatchNorm's scale) once, at compile time.
        stored = {i: v if jax.dtypes.issubdtype(getattr(v, "dtype", np.float32),
                                                 jax.dtypes.prng_key) else np.asarray(v)
                  for i, v in self.stored.items()}

        @jax.jit
        def forward(x):
            program = _trace(apply, jax.tree.unflatten(structure, shapes), x)
            leaves = [stored.get(i, _ABSENT) for i in range(len(shapes))]
            interpreter = _Interpreter(program, names, set(program.inputs[len(shapes):]),
                                       layers)
            missing = set(layers) - {name for name, _ in interpreter.maps.values()}
            if missing:
                raise ValueError(f"The compacted layers {sorted(missing)} are not linear maps "
                                 f"of the model at input shape {np.shape(x)}.")
            return interpreter.run([*leaves, *jax.tree.leaves(x)])[0]

        self._forward = forward

    def apply(self, inputs) -> jax.Array:
        """The compact model's (first) output for ``inputs``."""
        return self._forward(inputs)

    def weights(self) -> int:
        """Kernel entries the compact layers store (dense storage)."""
        return sum(int(np.size(layer.kernel)) for layer in self.layers.values())


def compact(model, variables=None, sample=None, *, apply_kwargs: Mapping | None = None
            ) -> CompactModel:
    """Removes the units a pruned model computes for nothing (see the module docstring).

    Args:
      model: a linen module, an NNX module or a function ``apply(params, x)``.
      variables: linen: the params or the full variables dict; NNX: None (the module's own
        state) or its params ``State``; function: its params.
      sample: (B, ...) a few inputs (one is enough) to trace the model with.
      apply_kwargs: keyword arguments every call needs (e.g. ``{"train": False}``).

    Returns:
      A `CompactModel` whose ``apply`` equals the pruned model's output (up to float rounding).
    """
    if sample is None:
        raise ValueError("compact needs a sample input to trace the model with.")
    apply_kwargs = dict(apply_kwargs or {})
    spec = _as_model(model, variables, apply_kwargs)
    flat, structure = jax.tree_util.tree_flatten_with_path(spec.state)
    names = _names(structure, spec.kind)
    leaves = [leaf for _, leaf in flat]
    sample = jnp.asarray(sample)[:1]
    program = Program(jax.make_jaxpr(spec.apply)(spec.state, sample))
    data = set(program.inputs[len(leaves):])
    located, _ = locate(program, len(leaves))
    kernels = {names[leaf]: (leaf, where) for leaf, where in located.items()}

    # Whole attention heads read by no output projection, with their q/k/v (`heads`).
    dots = {}
    for path, (leaf, where) in kernels.items():
        if where.op.name == "dot_general":
            position = 0 if where.op.inputs[0] != where.data else 1
            dots[path] = (where.op, position, where.data)
    heads = head_groups(program, dots, {p: _operand(program, kernels[p][1], position_, leaves)
                                        for p, (_, position_, _) in dots.items()})

    def plan(removals, probe=False):
        nonlocal heads
        plans: dict[str, CompactLayer] = {}
        interpreter = _Interpreter(program, names, data, plans, removals, probe, heads)
        with jax.default_matmul_precision("highest"):
            interpreter.run([*leaves, sample])
        if heads and interpreter.events.heads_failed:
            heads = {}  # a removed head was needed: every head stays
            return plan(removals, probe)
        return plans, interpreter.events

    # First the dead units (a zero kernel column: exact constants); then, where a producer's
    # units never come back to full width, also those no consumer reads.
    dead = {}
    for path, (leaf, where) in kernels.items():
        position = 0 if where.op.inputs[0] != where.data else 1
        _, out_axis = _axes(where.op, position, program)
        if out_axis is None:
            continue
        operand = _operand(program, where, position, leaves)
        columns = np.any(np.moveaxis(operand, out_axis, -1).reshape(-1, operand.shape[out_axis])
                         != 0, axis=0)
        dead[path] = np.flatnonzero(~columns)
    removals = {p: (units, np.array([], int)) for p, units in dead.items()}
    plans, events = plan(removals, probe=True)
    candidates = {source: units for source, units in events.unread.items()
                  if source not in events.widened and units}
    if not candidates:
        plans, _ = plan(removals)
    while candidates:
        trial = dict(removals)
        for source, units in candidates.items():
            unknown = np.array(sorted(set(units) - set(dead[source].tolist())), int)
            trial[source] = (np.union1d(dead[source], unknown), unknown)
        plans, events = plan(trial)
        failed = {s for s in candidates if s in events.widened}
        if not failed:
            break
        candidates = {s: u for s, u in candidates.items() if s not in failed}
        if not candidates:
            plans, _ = plan(removals)
    compacted = {kernels[path][0] for path in plans}
    stored = {i: leaf for i, leaf in enumerate(leaves) if i not in compacted}
    shapes = [jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype) for x in leaves]
    return CompactModel(model=model, layers=plans, stored=stored, structure=structure,
                        shapes=shapes, apply_kwargs=apply_kwargs, _apply=spec.apply)


def _operand(program: Program, where, position: int, leaves) -> np.ndarray:
    """The kernel as the contraction consumes it (the leaf through its layout ops)."""
    value = leaves[program.inputs.index(where.chain[0].inputs[0])] if where.chain else None
    if value is None:
        value = leaves[program.inputs.index(where.op.inputs[position])]
    value = np.asarray(value)
    for op in where.chain:
        value = np.asarray(bind_op(op, [value])[0])
    return value


# -- saving -----------------------------------------------------------------------------------

_FORMAT = 3


def save_compact(directory, compacted: CompactModel) -> pathlib.Path:
    """Writes the compact model's arrays to ``directory/compact.npz`` (zip-compressed; a kernel
    with zeros left is stored as a bit mask of its nonzeros plus their values, in row-major
    order, when that is smaller: below 31/32 nonzero for float32) and its structure to
    ``compact.json``. The model itself is code: pass it to `load_compact`."""
    path = pathlib.Path(directory).expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True)
    arrays = {}
    meta = {"format": _FORMAT, "layers": {}, "apply_kwargs": compacted.apply_kwargs,
            "leaves": [], "paths": _leaf_paths(compacted)}
    for index, shape in enumerate(compacted.shapes):
        key_typed = jax.dtypes.issubdtype(shape.dtype, jax.dtypes.prng_key)
        meta["leaves"].append({"shape": list(shape.shape), "key": bool(key_typed),
                               "dtype": str(shape.dtype), "stored": index in compacted.stored})
        if index in compacted.stored:
            value = compacted.stored[index]
            arrays[f"leaf|{index}"] = np.asarray(jax.random.key_data(value) if key_typed
                                                 else value)
    for number, (name, layer) in enumerate(compacted.layers.items()):
        key = f"layer|{number}"
        kernel = np.asarray(layer.kernel)
        nonzero = kernel.reshape(-1) != 0
        # One bit per entry against the bytes of the zeros it saves.
        sparse = (kernel.size - np.count_nonzero(nonzero)) * kernel.itemsize * 8 > kernel.size
        if sparse:
            arrays[f"{key}|kernel_mask"] = np.packbits(nonzero)
            arrays[f"{key}|kernel_values"] = kernel.reshape(-1)[nonzero]
        else:
            arrays[f"{key}|kernel"] = kernel
        for field in ("shift", "input_index", "output_index", "output_fill"):
            value = getattr(layer, field)
            if value is not None:
                arrays[f"{key}|{field}"] = np.asarray(value)
        if layer.heads is not None:
            arrays[f"{key}|heads"] = np.asarray(layer.heads)
        meta["layers"][name] = {"number": number, "shape": list(kernel.shape),
                                "dtype": str(kernel.dtype), "sparse": bool(sparse),
                                "width": layer.width, "head_axis": layer.head_axis}
    np.savez_compressed(path / "compact.npz", **arrays)
    (path / "compact.json").write_text(json.dumps(meta, indent=1))
    return path


def _leaf_paths(compacted: CompactModel) -> list[str]:
    tree = jax.tree.unflatten(compacted.structure, compacted.shapes)
    return ["/".join(path_keys(p)) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def load_compact(directory, model, variables=None) -> CompactModel:
    """The `CompactModel` `save_compact` wrote, for ``model`` (the same definition: a linen
    module, an NNX module — its structure is used, not its values — or a function; a function
    whose params are not nested dicts also needs ``variables``, any params of the same
    structure)."""
    path = pathlib.Path(directory).expanduser().absolute()
    if not (path / "compact.json").is_file() or not (path / "compact.npz").is_file():
        raise FileNotFoundError(f"No compact model in {path} (compact.json and compact.npz).")
    try:
        meta = json.loads((path / "compact.json").read_text())
        with np.load(path / "compact.npz") as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"The compact model in {path} is damaged: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path} holds compact format {found}, this hoyertrim reads "
                         f"{_FORMAT}; run `hoyertrim compact` again on its parent stage.")
    try:
        return _rebuild(meta, arrays, model, variables)
    except (KeyError, TypeError, IndexError) as error:
        raise ValueError(f"The compact model in {path} is damaged or was written for another "
                         f"model: {type(error).__name__}: {error}") from error


def _rebuild(meta, arrays, model, variables) -> CompactModel:
    shapes, stored = [], {}
    for index, info in enumerate(meta["leaves"]):
        if info["key"]:
            value = jax.random.wrap_key_data(arrays[f"leaf|{index}"]) if info["stored"] else None
            dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
        else:
            value = arrays.get(f"leaf|{index}")
            dtype = np.dtype(info["dtype"])
        shapes.append(jax.ShapeDtypeStruct(tuple(info["shape"]), dtype))
        if info["stored"]:
            stored[index] = value
    apply_kwargs = meta["apply_kwargs"]
    if isinstance(model, nnx.Module):
        structure = jax.tree.structure(_as_model(model, None, apply_kwargs).state)
    elif variables is not None and not isinstance(model, nn.Module):
        structure = jax.tree.structure(variables)
    else:
        structure = jax.tree.structure(_nested(meta["paths"], shapes))
    if structure.num_leaves != len(shapes):
        raise ValueError(f"the model has {structure.num_leaves} arrays, the file "
                         f"{len(shapes)}")
    layers = {}
    for name, info in meta["layers"].items():
        key = f"layer|{info['number']}"
        if info["sparse"]:
            size = int(np.prod(info["shape"]))
            kernel = np.zeros(size, info["dtype"])
            nonzero = np.unpackbits(arrays[f"{key}|kernel_mask"], count=size).astype(bool)
            kernel[nonzero] = arrays[f"{key}|kernel_values"]
            kernel = kernel.reshape(info["shape"])
        else:
            kernel = arrays[f"{key}|kernel"]
        layers[name] = CompactLayer(kernel=kernel, shift=arrays.get(f"{key}|shift"),
                                    input_index=arrays.get(f"{key}|input_index"),
                                    output_index=arrays.get(f"{key}|output_index"),
                                    output_fill=arrays.get(f"{key}|output_fill"),
                                    width=info["width"], heads=arrays.get(f"{key}|heads"),
                                    head_axis=info.get("head_axis"))
    return CompactModel(model=model, layers=layers, stored=stored, structure=structure,
                        shapes=shapes, apply_kwargs=apply_kwargs)


def _nested(paths: list[str], leaves: list) -> dict:
    tree: dict = {}
    for path, leaf in zip(paths, leaves):
        *parents, name = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = leaf
    return tree
