"""The linear maps of a model, found in its computation: every contraction with a parameter.

Any JAX model — linen, NNX, a plain function — multiplies its inputs by its weights through two
operations: ``dot_general`` (Dense, ``DenseGeneral``, ``Einsum``, the q/k/v/out projections of
attention, ``x @ w``) and ``conv_general_dilated`` (every convolution). Each such operation with
one operand that is a parameter leaf (possibly reshaped, transposed or reversed on the way) and
the other computed from the input is a linear map

    z = rows(x) @ U (+ b)          rows(x): (P, N),  U: (N, M),  b: (M,)

with rows the data operand's free positions (a conv's image patches), N the contracted features
and M the parameter's free axes (output units, e.g. heads × head_dim). A bias is the parameter
added right after the contraction. `LinearMap` reads U and b out of the params tree and writes
them back *in the parameter's own layout*, by running the parameter's reshapes/transposes on
index arrays (no per-layer-type code), and extracts rows(x) from the data operand.

What is refused, by name and with the reason, never pruned as if it were a map: a parameter
used by more than one operation (tied embeddings, weight sharing), a contraction whose two
operands are parameters, a contraction with batch axes on the parameter (per-group weights), a
parameter that is broadcast or sliced on its way, one used only inside a loop (``scan``) or by
an operation that is not a contraction (an embedding's ``gather``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hoyertrim.inspection.program import Const, Op, Program, bind_op
from hoyertrim.trees import layer_name, path_string, replace_leaves

__all__ = ["LinearMap", "Located", "Refusal", "find_linear_maps", "locate", "select_maps",
           "output_axes", "unit_groupings"]

# Operations that only move, relabel or retype a parameter's entries on its way to a use.
_CHAIN = {"reshape", "transpose", "convert_element_type", "copy", "copy_p", "rev", "squeeze",
          "expand_dims", "broadcast_in_dim"}
_CONTRACTIONS = {"dot_general", "conv_general_dilated"}
_PATCH_CHUNK = 128  # images whose conv patches are extracted at once (bounds memory)


@dataclasses.dataclass(frozen=True)
class Located:
    """Where a map sits in one trace of the model: its contraction, the data operand and the
    map's output (after the bias add, when there is one)."""

    op: Op
    data: int
    output: int
    chain: tuple[Op, ...]
    bias_leaf: int | None
    bias_chain: tuple[Op, ...]


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A parameter that is not prunable as a linear map, and why."""

    name: str
    path: str
    reason: str


def _derived(program: Program, num_params: int) -> dict[int, tuple[int, tuple[Op, ...]]]:
    """{variable: (param leaf, the chain of layout ops from the leaf to it)}."""
    derived = {program.inputs[i]: (i, ()) for i in range(num_params)}
    for op in program.ops:
        if (op.name in _CHAIN and op.inputs and isinstance(op.inputs[0], int)
                and op.inputs[0] in derived
                and all(isinstance(a, Const) for a in op.inputs[1:])):
            leaf, chain = derived[op.inputs[0]]
            derived[op.outputs[0]] = (leaf, chain + (op,))
    return derived


def _uses(program: Program, derived) -> dict[int, list[tuple[Op, int, int]]]:
    """{param leaf: [(op, operand position, variable)]} of every use that is not a chain op."""
    uses: dict[int, list] = {}
    for var, (leaf, _) in derived.items():
        for op, position in program.consumers.get(var, []):
            if op.name in _CHAIN and position == 0 and op.outputs[0] in derived:
                continue
            uses.setdefault(leaf, []).append((op, position, var))
    return uses


def locate(program: Program, num_params: int) -> tuple[dict[int, Located], dict[int, str]]:
    """The contraction of each param leaf that is used exactly once, by a contraction with the
    data (``{leaf: Located}``), and why each other leaf of ndim ≥ 2 is not (``{leaf: reason}``).
    Structural only: no values are needed, so it runs on any trace of the same model."""
    derived = _derived(program, num_params)
    uses = _uses(program, derived)
    found: dict[int, Located] = {}
    refused: dict[int, str] = {}
    for leaf in range(num_params):
        if len(program.shapes[program.inputs[leaf]]) < 2:
            continue
        leaf_uses = uses.get(leaf, [])
        if not leaf_uses:
            refused[leaf] = "not used by the model's computation"
            continue
        if len(leaf_uses) > 1:
            names = ", ".join(sorted({op.name for op, _, _ in leaf_uses}))
            refused[leaf] = (f"used by {len(leaf_uses)} operations ({names}): a shared (tied) "
                             "weight, which a layer-wise method cannot prune as one map")
            continue
        op, position, var = leaf_uses[0]
        reason = _contraction_problem(program, op, position)
        if reason:
            refused[leaf] = reason
            continue
        data = op.inputs[1 - position]
        output = op.outputs[0]
        bias_leaf, bias_chain, output = _bias(program, derived, uses, op, output)
        found[leaf] = Located(op, data, output, derived[var][1], bias_leaf, bias_chain)
    return found, refused


def _contraction_problem(program: Program, op: Op, position: int) -> str | None:
    if op.name not in _CONTRACTIONS:
        loop = " (inside a loop, which is not inspected)" if op.name in (
            "scan", "while", "cond") else " (not a contraction)"
        return f"used by {op.name}{loop}"
    other = op.inputs[1 - position]
    if program.is_static(other):
        return "contracted with another parameter or a constant, not with the data"
    if op.name == "dot_general":
        (_, _), (lhs_batch, rhs_batch) = op.params["dimension_numbers"]
        if lhs_batch or rhs_batch:
            return "a batched contraction (per-group weights)"
    else:
        if position != 1:
            return "the convolution's image operand, not its kernel"
        if op.params.get("batch_group_count", 1) != 1:
            return "a convolution with batch_group_count > 1"
    return None


def _bias(program: Program, derived, uses, op: Op, output: int):
    """The param leaf added right after the contraction (its bias), if there is exactly one."""
    consumers = program.consumers.get(output, [])
    if len(consumers) != 1 or op.name == "dot_general" and _param_is_lhs(op, derived):
        return None, (), output
    add, position = consumers[0]
    if add.name != "add":
        return None, (), output
    other = add.inputs[1 - position]
    if not isinstance(other, int) or other not in derived:
        return None, (), output
    leaf, chain = derived[other]
    if len(uses.get(leaf, [])) != 1 or program.shapes[add.outputs[0]] != program.shapes[output]:
        return None, (), output
    return leaf, chain, add.outputs[0]


def _param_is_lhs(op: Op, derived) -> bool:
    return isinstance(op.inputs[0], int) and op.inputs[0] in derived


def _run_chain(chain: Sequence[Op], value: np.ndarray) -> np.ndarray:
    """The chain of layout ops applied to ``value`` (an index array: retyping steps skipped)."""
    for op in chain:
        if op.name in ("convert_element_type", "copy", "copy_p"):
            continue
        value = np.asarray(bind_op(op, [value])[0])
    return value


@dataclasses.dataclass(frozen=True, eq=False)
class LinearMap:
    """One linear map ``z = rows(x) @ U + b`` of a model, tied to its parameter leaves.

    Attributes:
      name: the layer's name (`trees.layer_name` of the kernel's path: ``"block0/attn/query"``).
      path: the kernel leaf's full path.
      kernel_leaf, bias_leaf: flat indices of the kernel and bias (None) in the params' leaves.
      index: (N, M) int: which entry of the flattened kernel leaf each matrix entry is (-1: an
        entry that does not exist, e.g. outside a grouped convolution's blocks).
      bias_index: (M,) which entry of the flattened bias leaf each output unit adds.
      kind: ``"dot_general"`` or ``"conv"``.
      input_units: (N,) the input unit (feature / channel) each matrix row reads.
      rows_per_example: output rows per example (positions of a conv, tokens of a sequence).
      units_trailing: the output units are the last axes of the map's output.
      shape: the kernel leaf's shape.
    """

    name: str
    path: str
    kernel_leaf: int
    bias_leaf: int | None
    index: np.ndarray
    bias_index: np.ndarray | None
    kind: str
    input_units: np.ndarray
    rows_per_example: int
    units_trailing: bool
    shape: tuple[int, ...]
    _data_axes: tuple[int, ...]
    _out_axes: tuple[int, ...]
    _conv: dict | None

    @property
    def num_inputs(self) -> int:
        return int(self.index.shape[0])

    @property
    def num_outputs(self) -> int:
        return int(self.index.shape[1])

    @property
    def weights(self) -> int:
        """Entries of the kernel leaf."""
        return int(math.prod(self.shape))

    def support(self) -> np.ndarray | None:
        """(N, M) bool of the matrix entries that exist (None: all)."""
        return None if np.all(self.index >= 0) else self.index >= 0

    def unit_groupings(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(per output unit, per input unit): the kernel leaf's axes each group norm reduces,
        in the leaf's own layout — the `penalties` groupings whose groups are this map's units
        (a Dense's columns and rows; a conv's filters and input channels; an attention q/k/v
        projection's heads and input features; an output projection's output features and
        heads). None when the units are not whole axes of the leaf."""
        valid = self.index >= 0
        if not valid.all():
            return None
        coords = np.unravel_index(self.index, self.shape)
        # Axes of length 1 are constant along both; they name units only when nothing else does.
        axes = sorted(range(len(self.shape)), key=lambda a: self.shape[a] == 1)
        by_row = [a for a in axes if np.all(coords[a] == coords[a][:, :1])]
        by_column = [a for a in axes if np.all(coords[a] == coords[a][:1, :])]
        if not by_row or not by_column:
            return None
        # The output units: the first axis the columns run along (a head before its dims).
        output = by_column[0]
        # The input units: the axis whose coordinate names each row's unit, one to one.
        def names_units(axis):
            pairs = np.unique(np.stack([coords[axis][:, 0], self.input_units]), axis=1)
            return pairs.shape[1] == len(np.unique(self.input_units)) == len(
                np.unique(coords[axis][:, 0]))

        inputs = [a for a in by_row if names_units(a)]
        if not inputs:
            return None
        axes = tuple(range(len(self.shape)))
        return (tuple(a for a in axes if a != output), tuple(a for a in axes if a != inputs[0]))

    def matrix(self, params) -> np.ndarray:
        """(N, M) the kernel as a matrix (rows: input features, columns: output units)."""
        return self.matrix_of(jax.tree.leaves(params)[self.kernel_leaf])

    def matrix_of(self, kernel) -> np.ndarray:
        """(N, M) the matrix of a kernel leaf of this map's shape."""
        flat = np.asarray(kernel).reshape(-1)
        return np.where(self.index >= 0, flat[np.maximum(self.index, 0)], 0).astype(flat.dtype)

    def bias(self, params) -> np.ndarray | None:
        """(M,) the bias, or None when the map has none."""
        if self.bias_leaf is None:
            return None
        return np.asarray(jax.tree.leaves(params)[self.bias_leaf]).reshape(-1)[self.bias_index]

    def with_matrix(self, params, matrix: np.ndarray, bias: np.ndarray | None = None):
        """``params`` with the kernel leaf set from ``matrix`` (N, M) (and the bias from
        ``bias``), each in its own layout and dtype; nothing else changes."""
        leaves = jax.tree.leaves(params)
        kernel = np.asarray(leaves[self.kernel_leaf])
        flat = kernel.reshape(-1).copy()
        valid = self.index >= 0
        flat[self.index[valid]] = np.asarray(matrix)[valid]
        new = {self.kernel_leaf: jnp.asarray(flat.reshape(kernel.shape), kernel.dtype)}
        if bias is not None and self.bias_leaf is not None:
            old = np.asarray(leaves[self.bias_leaf])
            flat_bias = old.reshape(-1).copy()
            flat_bias[self.bias_index] = np.asarray(bias)
            new[self.bias_leaf] = jnp.asarray(flat_bias.reshape(old.shape), old.dtype)
        return replace_leaves(params, new)

    def output_rows(self, z) -> np.ndarray:
        """(rows, M) the map's output ``z`` (as recorded) with one row per output position."""
        return np.asarray(z).transpose(self._out_axes).reshape(-1, self.num_outputs)

    def recorded_input(self, data) -> np.ndarray:
        """What is kept of the data operand of one batch, batch-major so that batches
        concatenate along axis 0: a dot's (rows, N) inputs, a convolution's images."""
        if self._conv is None:
            return np.asarray(data).transpose(self._data_axes).reshape(-1, self.num_inputs)
        return np.moveaxis(np.asarray(data), self._conv["dimension_numbers"].lhs_spec[0], 0)

    def input_rows(self, recorded, rows: np.ndarray | None = None) -> np.ndarray:
        """(len(rows), N) the inputs of the output rows ``rows`` (indices into
        `output_rows`; None: all), from `recorded_input`'s arrays."""
        if self._conv is None:
            return recorded if rows is None else recorded[rows]
        data = jnp.asarray(recorded)
        batch = data.shape[0]
        positions = self.rows_per_example
        rows = np.arange(batch * positions) if rows is None else np.asarray(rows)
        images = rows // positions
        out = np.empty((len(rows), self.num_inputs), np.float32)
        for start in range(0, batch, _PATCH_CHUNK):
            chunk = (images >= start) & (images < start + _PATCH_CHUNK)
            if not np.any(chunk):
                continue
            part = np.moveaxis(data[start:start + _PATCH_CHUNK], 0,
                               self._conv["dimension_numbers"].lhs_spec[0])
            out[chunk] = np.asarray(self._patches(part))[rows[chunk] - start * positions]
        return out

    def _patches(self, images) -> jax.Array:
        """(B·positions, N) the patches each output position multiplies: the same convolution
        (padding, strides, dilations, layout) run with an identity kernel."""
        conv = self._conv
        spatial, channels = conv["spatial"], conv["channels"]
        eye = jnp.eye(self.num_inputs, dtype=jnp.float32).reshape(
            *spatial, channels, self.num_inputs)
        rhs = eye.transpose(np.argsort(conv["to_hwio"]))
        out = jax.lax.conv_general_dilated(
            images.astype(jnp.float32), rhs, conv["window_strides"], conv["padding"],
            conv["lhs_dilation"], conv["rhs_dilation"], conv["dimension_numbers"],
            precision=jax.lax.Precision.HIGHEST)
        return out.transpose(self._out_axes).reshape(-1, self.num_inputs)


def _input_units(index: np.ndarray, leaf_shape: tuple, contracted: tuple[int, ...]
                 ) -> np.ndarray:
    """(N,) the input unit of each matrix row. A kernel of ndim ≥ 3 reshaped into one contracted
    axis with its last axis as the outputs is a convolution written as patches @ kernel (Flax's
    (…window, I, O) layout): its units are the input channels (axis -2), one per window tap. A
    map contracting several axes (attention's output projection: (heads, head dim)) has the
    first as its units — a head is removed whole, with its q/k/v (`compact`). Otherwise every
    row (a feature) is its own unit."""
    n, m = index.shape
    if (len(leaf_shape) >= 3 and len(contracted) == 1 and m == leaf_shape[-1]
            and np.array_equal(index, np.arange(n * m).reshape(n, m))):
        return np.arange(n) % leaf_shape[-2]
    if len(contracted) >= 2:
        return np.arange(n) // (n // contracted[0])
    return np.arange(n)


def _dot_map(program: Program, located: Located, param_position: int, index_op: np.ndarray):
    op = located.op
    (lhs_c, rhs_c), _ = op.params["dimension_numbers"]
    param_c, data_c = (lhs_c, rhs_c) if param_position == 0 else (rhs_c, lhs_c)
    param_c, data_c = tuple(param_c), tuple(data_c)
    param_free = tuple(a for a in range(index_op.ndim) if a not in param_c)
    data_ndim = len(program.shapes[located.data])
    data_free = tuple(a for a in range(data_ndim) if a not in data_c)
    n = int(math.prod(index_op.shape[a] for a in param_c))
    m = int(math.prod(index_op.shape[a] for a in param_free))
    index = index_op.transpose(param_c + param_free).reshape(n, m)
    out_ndim = len(data_free) + len(param_free)
    if param_position == 1:  # output axes: data free, then param free
        out_axes, trailing = tuple(range(out_ndim)), True
    else:  # param free first: move the units last
        k = len(param_free)
        out_axes, trailing = tuple(range(k, out_ndim)) + tuple(range(k)), False
    leaf_shape = program.shapes[program.inputs[_leaf_of(program, located)]]
    contracted = tuple(index_op.shape[a] for a in param_c)
    return dict(index=index, input_units=_input_units(index, leaf_shape, contracted),
                units_trailing=trailing,
                _data_axes=data_free + data_c, _out_axes=out_axes, _conv=None)


def _leaf_of(program: Program, located: Located) -> int:
    var = located.chain[0].inputs[0] if located.chain else located.op.inputs[
        1 if located.op.inputs[0] == located.data else 0]
    return program.inputs.index(var)


def _conv_map(program: Program, located: Located, index_op: np.ndarray):
    params = located.op.params
    dn = params["dimension_numbers"]
    to_hwio = tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[1], dn.rhs_spec[0])
    kernel = index_op.transpose(to_hwio)  # (*window, C / groups, O)
    *spatial, per_group, outputs = kernel.shape
    groups = int(params.get("feature_group_count", 1))
    channels = per_group * groups
    full = np.full((*spatial, channels, outputs), -1, index_op.dtype)
    per_out = outputs // groups
    for g in range(groups):
        full[..., g * per_group:(g + 1) * per_group, g * per_out:(g + 1) * per_out] = \
            kernel[..., g * per_out:(g + 1) * per_out]
    n = int(math.prod(spatial)) * channels
    out_spec = dn.out_spec
    out_axes = (out_spec[0], *out_spec[2:], out_spec[1])
    conv = dict(spatial=tuple(spatial), channels=channels, to_hwio=to_hwio,
                dimension_numbers=dn, window_strides=params["window_strides"],
                padding=params["padding"], lhs_dilation=params["lhs_dilation"],
                rhs_dilation=params["rhs_dilation"])
    return dict(index=full.reshape(n, outputs), input_units=np.arange(n) % channels,
                units_trailing=out_spec[1] == len(out_spec) - 1, _data_axes=(),
                _out_axes=out_axes, _conv=conv)


def _bias_index(program: Program, located: Located, num_outputs: int,
                out_axes: tuple[int, ...]) -> np.ndarray | None:
    leaf_shape = program.shapes[program.inputs[located.bias_leaf]]
    if math.prod(leaf_shape) != num_outputs:
        return None
    probe = _run_chain(located.bias_chain, np.arange(num_outputs).reshape(leaf_shape))
    try:
        full = np.broadcast_to(probe, program.shapes[located.output])
    except ValueError:
        return None
    rows = full.transpose(out_axes).reshape(-1, num_outputs)
    if not np.all(rows == rows[:1]) or sorted(rows[0]) != list(range(num_outputs)):
        return None
    return rows[0]


def find_linear_maps(program: Program, params, batch: int
                     ) -> tuple[list[LinearMap], list[Refusal], dict[int, Located]]:
    """Every linear map of the traced model, in the order the computation runs them, and every
    parameter of ndim ≥ 2 that is not one, with the reason.

    Args:
      program: the model's `Program`, traced as ``apply(params, x)`` (params first).
      params: the params pytree that was traced.
      batch: the traced input's batch size (to count rows per example).

    Returns:
      The maps, the refusals, and where each map sits in ``program`` (by kernel leaf).
    """
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    located, refused = locate(program, len(paths))
    maps = []
    for leaf, where in sorted(located.items(), key=lambda item: program.ops.index(item[1].op)):
        shape = program.shapes[program.inputs[leaf]]
        index_op = _run_chain(where.chain, np.arange(math.prod(shape)).reshape(shape))
        if np.unique(index_op).size != index_op.size or index_op.size != math.prod(shape):
            refused[leaf] = "broadcast or sliced on its way to the contraction"
            continue
        position = 0 if where.op.inputs[0] != where.data else 1
        if where.op.name == "dot_general":
            layout = _dot_map(program, where, position, index_op)
        else:
            layout = _conv_map(program, where, index_op)
        num_outputs = layout["index"].shape[1]
        bias_index = None
        if where.bias_leaf is not None:
            bias_index = _bias_index(program, where, num_outputs, layout["_out_axes"])
        rows = math.prod(program.shapes[where.output]) // num_outputs
        maps.append(LinearMap(
            name=layer_name(paths[leaf]), path=path_string(paths[leaf]), kernel_leaf=leaf,
            bias_leaf=where.bias_leaf if bias_index is not None else None, bias_index=bias_index,
            kind="conv" if where.op.name == "conv_general_dilated" else "dot_general",
            rows_per_example=max(rows // max(batch, 1), 1), shape=tuple(shape), **layout))
    biases = {m.bias_leaf for m in maps}  # a (heads, head_dim) bias is a map's, not refused
    refusals = [Refusal(layer_name(paths[leaf]), path_string(paths[leaf]), reason)
                for leaf, reason in sorted(refused.items()) if leaf not in biases]
    return maps, refusals, located


def select_maps(maps: Sequence[LinearMap], refusals: Sequence[Refusal],
                names: Sequence[str] | str | None) -> list[LinearMap]:
    """The maps named (default: all), in computation order; a clear error for a name that is
    unknown or refused (with the reason), and when the model has no linear map at all."""
    if not maps and names is None:
        why = "; ".join(f"{r.name}: {r.reason}" for r in refusals) or \
            "no parameter of ndim ≥ 2 is contracted with the input"
        raise ValueError(f"The model has no linear map to prune ({why}).")
    if names is None:
        return list(maps)
    names = [names] if isinstance(names, str) else list(names)
    by_name = {m.name: m for m in maps}
    refused = {r.name: r for r in refusals}
    for name in names:
        if name in refused:
            raise NotImplementedError(
                f"Layer {name!r} cannot be pruned: {refused[name].reason}. Leave it out of "
                f"layers=[...]; prunable layers are {list(by_name)}.")
        if name not in by_name:
            raise ValueError(f"Unknown layers [{name!r}]; prunable layers are {list(by_name)}.")
    wanted = set(names)
    return [m for m in maps if m.name in wanted]


def unit_groupings(maps: Sequence[LinearMap]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """{layer: (per output unit, per input unit) groupings} of the maps whose units are whole
    axes of their kernel (`LinearMap.unit_groupings`): the groups DeepHoyer's Group-HS and group
    lasso penalize, read off the computation — an attention projection's heads rather than the
    default groupings' last two axes."""
    found = {}
    for lmap in maps:
        groupings = lmap.unit_groupings()
        if groupings is not None:
            found[lmap.name] = groupings
    return found


def output_axes(groupings: dict) -> dict[str, int]:
    """{layer: its kernel's output-unit axis}: the axis the output grouping of `unit_groupings`
    keeps."""
    return {name: next(a for a in range(len(out) + 1) if a not in out)
            for name, (out, _) in groupings.items()}
