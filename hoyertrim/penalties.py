"""Sparsity penalties: pure functions of one array, returning a scalar.

DeepHoyer (Yang, Wen & Li, "DeepHoyer: Learning Sparser Neural Network with Differentiable
Scale-Invariant Sparsity Measures", ICLR 2020) introduces

    Hoyer-Square      HS(w)  = ‖w‖₁² / ‖w‖₂²                 1 ≤ HS(w) ≤ n, HS(c·w) = HS(w)
    Group-HS          GHS(W) = (Σ_g ‖w_g‖₂)² / ‖W‖₂²         = HS(vector of group norms)

Being scale-invariant, ⟨∇HS(w), w⟩ = 0: the gradient moves mass between coordinates instead of
shrinking all of them, which is why HS prunes harder than L1 at the same accuracy. Baselines of the
same family: L1, group lasso Σ_g ‖w_g‖₂ (Wen et al. 2016), transformed L1 Σ (a+1)|w| / (a+|w|).

Every function returns 0 with a zero (finite) gradient at an all-zero tensor (or an all-zero
group), never NaN; the official DeepHoyer code skips such tensors, which is the same thing.

Groupings: a grouping is the tuple of axes reduced to form one group norm. The DeepHoyer default
for a kernel of ndim ≥ 2 (Flax layouts: Dense (I, O), Conv (H, W, I, O)) sums two groupings: one
group per output neuron/filter (reduce every axis but the last) and one per input neuron/channel
(reduce every axis but the second to last). This module depends on nothing else in hoyertrim
but `trees` (leaf names alike in linen params, NNX ``State`` and plain pytrees).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from hoyertrim.trees import layer_name, leaf_name, path_string

Grouping = tuple[int, ...]
Penalty = Callable[[jax.Array], jax.Array]


def _safe_ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, and 0 (with a 0 gradient) where the denominator is 0."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def _safe_norm(x: jax.Array, axis) -> jax.Array:
    """Euclidean norm over ``axis`` whose gradient at a zero group is 0 instead of NaN."""
    squared = jnp.sum(jnp.square(x), axis=axis)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def _abs(w: jax.Array) -> jax.Array:
    """|w| with the subgradient sign(w), i.e. 0 at w = 0 (jnp.abs differentiates to 1 there)."""
    return w * jax.lax.stop_gradient(jnp.sign(w))


def l1(w: jax.Array) -> jax.Array:
    """‖w‖₁."""
    return jnp.sum(_abs(w))


def hoyer(w: jax.Array) -> jax.Array:
    """Hoyer's sparsity measure ‖w‖₁ / ‖w‖₂ (Hoyer 2004), in [1, √n] for nonzero ``w``."""
    return _safe_ratio(l1(w), _safe_norm(w, axis=None))


def hoyer_square(w: jax.Array) -> jax.Array:
    """Hoyer-Square ‖w‖₁² / ‖w‖₂² (DeepHoyer eq. 3), in [1, n] for nonzero ``w``."""
    return _safe_ratio(jnp.square(l1(w)), jnp.sum(jnp.square(w)))


def transformed_l1(w: jax.Array, a: float = 1.0) -> jax.Array:
    """Transformed L1 Σ (a+1)|w| / (a+|w|) (Zhang & Xin 2018); ``a`` > 0 (1 in DeepHoyer)."""
    magnitude = _abs(w)
    return jnp.sum((a + 1.0) * magnitude / (a + magnitude))


def default_groupings(ndim: int) -> tuple[Grouping, ...]:
    """DeepHoyer's two groupings of a kernel: per output unit and per input unit.

    For ndim ≥ 2: reduce all axes but the last (one group per output neuron / filter) and all
    axes but the second to last (one group per input neuron / channel). For ndim ≤ 1 every
    element is its own group, so Group-HS reduces to Hoyer-Square.
    """
    if ndim < 2:
        return ((),)
    axes = tuple(range(ndim))
    return (axes[:-1], axes[:-2] + axes[-1:])


def group_norms(w: jax.Array, grouping: Grouping) -> jax.Array:
    """‖w_g‖₂ of each group: the norm over the axes in ``grouping`` (() means |w|)."""
    if not grouping:
        return _abs(w)
    return _safe_norm(w, axis=tuple(grouping))


def _check_groupings(ndim: int, groupings: Sequence[Grouping] | None) -> tuple[Grouping, ...]:
    groupings = default_groupings(ndim) if groupings is None else tuple(map(tuple, groupings))
    for grouping in groupings:
        if any(not -ndim <= axis < ndim for axis in grouping):
            raise ValueError(f"Grouping {grouping} has an axis out of range for a {ndim}-d array.")
    return groupings


def group_hoyer_square(w: jax.Array, groupings: Sequence[Grouping] | None = None) -> jax.Array:
    """Group-HS (DeepHoyer eq. 5) summed over ``groupings``: Σ_G (Σ_g ‖w_g‖₂)² / ‖w‖₂².

    Args:
      w: a kernel, e.g. Dense (I, O) or Conv (H, W, I, O).
      groupings: tuples of axes reduced to form group norms; default `default_groupings`
        (output units + input units). ``[()]`` gives one group per element, i.e. HS.
    """
    total = jnp.sum(jnp.square(w))
    return sum(_safe_ratio(jnp.square(jnp.sum(group_norms(w, g))), total)
               for g in _check_groupings(w.ndim, groupings))


def group_lasso(w: jax.Array, groupings: Sequence[Grouping] | None = None) -> jax.Array:
    """Group lasso Σ_G Σ_g ‖w_g‖₂ over ``groupings`` (default `default_groupings`)."""
    return sum(jnp.sum(group_norms(w, g)) for g in _check_groupings(w.ndim, groupings))


PENALTIES: dict[str, Penalty] = {
    "hoyer": hoyer,
    "hoyer_square": hoyer_square,
    "group_hoyer_square": group_hoyer_square,
    "l1": l1,
    "group_lasso": group_lasso,
    "transformed_l1": transformed_l1,
}


def is_kernel(path: tuple, leaf: jax.Array) -> bool:
    """Default leaf filter: the kernels of Dense/Conv/attention layers — leaves named ``kernel``
    with ndim ≥ 2, in linen params and NNX ``State`` alike (an NNX path's ``.value`` is skipped).

    Biases, norm scales/offsets and embedding tables are not regularized or pruned by default.
    For a model whose weights have other names (a plain function's ``{"w1": ...}``), pass a
    filter of your own, e.g. `hoyertrim.inspection.contraction_filter`, which selects exactly the
    parameters the model contracts with its inputs.
    """
    return leaf_name(path) == "kernel" and getattr(leaf, "ndim", 0) >= 2


def selected_leaves(params, where: Callable[[tuple, jax.Array], bool], what: str) -> list:
    """``[(path, leaf)]`` of the leaves ``where`` selects; a clear error when it selects none
    (a penalty of 0 or a mask that keeps everything would otherwise pass silently)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    selected = [(path, leaf) for path, leaf in leaves if where(path, leaf)]
    if not selected:
        names = [path_string(path) for path, _ in leaves[:8]]
        more = ", …" if len(leaves) > 8 else ""
        raise ValueError(
            f"{what}: the leaf filter selects no parameter of this tree ({len(leaves)} leaves: "
            f"{', '.join(names) or 'none'}{more}). The default selects leaves named 'kernel' "
            "(ndim ≥ 2); pass where=... (e.g. hoyertrim.inspection.contraction_filter(apply, "
            "params, sample)) to choose the weights.")
    return selected


def tree_penalty(penalty: Penalty, params, where: Callable[[tuple, jax.Array], bool] = is_kernel,
                 per_layer: Mapping[str, Penalty] | None = None) -> jax.Array:
    """Σ penalty(leaf) over the leaves of ``params`` selected by ``where(path, leaf)``.

    As in DeepHoyer, each layer is penalized on its own and the layer penalties are added.
    ``params`` may be linen params, an NNX ``State`` or any pytree. ``per_layer``: {layer name
    (`trees.layer_name`): penalty} used instead of ``penalty`` for those layers (Group-HS with
    each layer's own unit axes, `inspection.LinearMap.unit_groupings`).

    Raises:
      ValueError: ``where`` selects no leaf (the penalty would silently be 0).
    """
    per_layer = per_layer or {}
    selected = selected_leaves(params, where, "tree_penalty")
    unknown = set(per_layer) - {layer_name(path) for path, _ in
                                jax.tree_util.tree_flatten_with_path(params)[0]}
    if unknown:
        raise ValueError(f"tree_penalty: per_layer names layers the params do not have: "
                         f"{sorted(unknown)}.")
    return sum(per_layer.get(layer_name(path), penalty)(leaf) for path, leaf in selected)


def coupled_group_squares(params, groups: Sequence, output_axes: Mapping[str, int]) -> jax.Array:
    """(G,) Σ of squared weights of each coupled group: every member's output slab (layer
    ``l``'s unit ``u``: its kernel's entries at index ``u`` of axis ``output_axes[l]``) added
    together — the group DeepHoyer's Group-HS sees when units of several layers go only together
    (`inspection.coupled_groups`: a residual stream's channel).

    Args:
      params: the params tree (kernels found by `trees.layer_name` and the leaf name ``kernel``).
      groups: `inspection.CoupledGroup` s (their ``members``: (layer, unit) pairs).
    """
    members: dict[str, tuple[list, list]] = {}
    for number, group in enumerate(groups):
        for layer, unit in group.members:
            units, ids = members.setdefault(layer, ([], []))
            units.append(unit)
            ids.append(number)
    squares = jnp.zeros(len(groups))
    found = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        layer = layer_name(path)
        if layer not in members or leaf_name(path) != "kernel":
            continue
        axis = output_axes[layer] % leaf.ndim
        columns = jnp.sum(jnp.square(leaf), axis=tuple(a for a in range(leaf.ndim) if a != axis))
        units, ids = members[layer]
        squares = squares.at[jnp.asarray(ids)].add(columns[jnp.asarray(units)])
        found.add(layer)
    if found != set(members):
        raise ValueError(f"coupled groups name layers with no kernel in params: "
                         f"{sorted(set(members) - found)}")
    return squares


def coupled_group_penalty(params, groups: Sequence, output_axes: Mapping[str, int],
                          kind: str = "group_hoyer_square") -> jax.Array:
    """Group-HS ``(Σ_g ‖w_g‖)² / Σ_g ‖w_g‖²`` or group lasso ``Σ_g ‖w_g‖`` over the coupled
    groups (`coupled_group_squares`): one term for all of them, as DeepHoyer applies Group-HS
    to one layer's groups."""
    if kind not in ("group_hoyer_square", "group_lasso"):
        raise ValueError(f"kind must be 'group_hoyer_square' or 'group_lasso', got {kind!r}.")
    squares = coupled_group_squares(params, groups, output_axes)
    positive = squares > 0
    norms = jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)
    if kind == "group_lasso":
        return jnp.sum(norms)
    return _safe_ratio(jnp.square(jnp.sum(norms)), jnp.sum(squares))
