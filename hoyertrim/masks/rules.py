"""Mask rules: which weights a pruned network keeps, as bool pytrees shaped like the params.

`threshold_masks` (|w| ≥ t), `std_threshold_masks` (|w| ≥ s·std(w) per tensor, DeepHoyer's
MNIST rule), `magnitude_masks` (target sparsity per layer or global), `count_masks` (a number of
weights per layer), `group_masks` and `input_unit_masks` (structured: whole output/input units
by their norm), `top_k_mask` and `nm_mask` (the shared tie rule; N:M patterns). Only leaves
selected by ``where`` (default: Dense/Conv kernels) are pruned; other leaves get all-True masks.

A rule that would remove every weight of a layer keeps that layer's largest-magnitude weight (or
group) and warns, so the network is never silently disconnected.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hoyertrim.penalties import (coupled_group_squares, default_groupings, group_norms, is_kernel,
                                 selected_leaves)
from hoyertrim.trees import layer_name, leaf_name

__all__ = ["LeafFilter", "apply_masks", "check_nm", "count_masks", "coupled_group_masks",
           "full_masks", "group_masks",
           "input_unit_masks", "kernel_nonzero_masks", "magnitude_masks", "nm_mask",
           "nonzero_masks", "std_threshold_masks", "threshold_masks", "top_k_mask"]

LeafFilter = Callable[[tuple, jax.Array], bool]


def _map_selected(fn: Callable[[str, jax.Array], jax.Array], params, where: LeafFilter,
                  named: Mapping | None = None):
    """Applies ``fn(layer, leaf)`` to selected leaves; all-True masks elsewhere. The masks have
    the structure of ``params`` (linen params, NNX ``State``, any pytree); a filter that selects
    no leaf, or ``named`` settings of a layer the params do not have, is an error (the masks would
    silently keep everything, or ignore the setting)."""
    selected_leaves(params, where, "mask rule")
    unknown = set(named or {}) - {layer_name(path) for path, _ in
                                  jax.tree_util.tree_flatten_with_path(params)[0]}
    if unknown:
        raise ValueError(f"mask rule: groupings name layers the params do not have: "
                         f"{sorted(unknown)}.")

    def leaf_mask(path, leaf):
        if where(path, leaf):
            return fn(layer_name(path), leaf)
        return jnp.ones(jnp.shape(leaf), bool)
    return jax.tree_util.tree_map_with_path(leaf_mask, params)


def top_k_mask(scores: jax.Array, keep) -> jax.Array:
    """True at the ``keep`` largest ``scores`` (any shape); ties go to the lower flat index.

    ``keep`` may be a traced integer: the mask is ``rank < keep`` with ranks from a stable sort,
    so this runs under `jit` (e.g. inside gradual pruning's schedule). Every rule that keeps "the
    largest" weights uses it, so all share one tie rule.
    """
    flat = scores.reshape(-1)
    order = jnp.argsort(-flat, stable=True)
    ranks = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return (ranks < keep).reshape(scores.shape)


def check_nm(nm: tuple[int, int], num_inputs: int) -> None:
    """Raises ValueError unless ``nm`` = (N, M) with 0 < N ≤ M is a pattern for a layer of
    ``num_inputs`` inputs (groups of M consecutive inputs: a multiple of M)."""
    n, m = nm
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < N ≤ M, got {n}:{m}.")
    if num_inputs % m:
        raise ValueError(f"N:M groups M consecutive inputs; this layer has {num_inputs} inputs, "
                         f"not a multiple of M = {m}.")


def nm_mask(scores, n: int, m: int) -> np.ndarray:
    """Keeps the ``n`` highest ``scores`` of every ``m`` consecutive rows, per column (the N:M
    pattern sparse tensor cores run; 2:4 keeps 2 of every 4 inputs of an output unit).

    Args:
      scores: (N, M_out), N a multiple of ``m``.

    Returns:
      bool (N, M_out) with exactly ``n`` True in each group (ties to the lower row).
    """
    scores = np.asarray(scores)
    rows, cols = scores.shape
    check_nm((n, m), rows)
    groups = scores.reshape(rows // m, m, cols)
    order = np.argsort(-groups, axis=1, kind="stable")
    mask = np.zeros_like(groups, bool)
    np.put_along_axis(mask, order[:, :n], True, axis=1)
    return mask.reshape(rows, cols)


def _never_empty(layer: str, leaf: jax.Array, mask: jax.Array) -> jax.Array:
    """Keeps the largest weight of a layer the mask would empty (unless the layer is all zero).

    Jit-safe; the warning is only issued when the arrays are concrete (outside traced code).
    """
    empty = ~jnp.any(mask) & jnp.any(leaf != 0)
    guarded = mask | (top_k_mask(jnp.abs(leaf), 1) & empty)
    if not isinstance(empty, jax.core.Tracer) and bool(empty):
        warnings.warn(f"Pruning would remove every weight of layer {layer!r}; keeping its "
                      "largest weight so the network stays connected. Use a gentler "
                      "threshold/sparsity.", stacklevel=3)
    return guarded


def full_masks(params) -> Any:
    """All-True masks (nothing pruned)."""
    return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)


def nonzero_masks(params) -> Any:
    """Masks of the nonzero entries of every leaf (e.g. of an already pruned network)."""
    return jax.tree.map(lambda p: jnp.asarray(p) != 0, params)


def kernel_nonzero_masks(params) -> Any:
    """The masks of a pruned network as Net-Trim and the pipeline stages store them: True where
    a kernel (a leaf named ``kernel``) is nonzero — pruned weights are exact zeros — and every
    other leaf (biases, BatchNorm) kept."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: (jnp.asarray(p) != 0) if leaf_name(path) == "kernel"
        else jnp.ones(jnp.shape(p), bool), params)


def threshold_masks(params, threshold: float, where: LeafFilter = is_kernel):
    """Keeps weights with ``|w| ≥ threshold`` (and w ≠ 0) in the selected leaves."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}.")
    return _map_selected(
        lambda name, w: _never_empty(name, w, (jnp.abs(w) >= threshold) & (w != 0)), params, where)


def std_threshold_masks(params, scale: float, where: LeafFilter = is_kernel):
    """Per tensor, keeps ``|w| ≥ scale · std(w)`` (DeepHoyer's MNIST rule, scale ≈ 0.03 for HS)."""
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}.")
    return _map_selected(
        lambda name, w: _never_empty(name, w, (jnp.abs(w) >= scale * jnp.std(w)) & (w != 0)),
        params, where)


def magnitude_masks(params, sparsity: float | Mapping[str, float], *, scope: str = "layer",
                    where: LeafFilter = is_kernel):
    """Keeps the largest-magnitude weights so that a fraction ``sparsity`` is removed.

    Args:
      params: params pytree.
      sparsity: removed fraction in [0, 1): one number, or ``{layer_name: sparsity}`` (layers
        not listed are left dense; only with ``scope="layer"``).
      scope: ``"layer"`` (each selected leaf separately) or ``"global"`` (one threshold over all
        selected leaves, as in Han et al.'s global magnitude pruning).
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
    values = sparsity.values() if isinstance(sparsity, Mapping) else [sparsity]
    if any(not 0 <= s < 1 for s in values):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}.")
    if scope == "global":
        if isinstance(sparsity, Mapping):
            raise ValueError("A per-layer sparsity mapping needs scope='layer'.")
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        selected = [layer_name(path) for path, leaf in leaves if where(path, leaf)]
        sizes = [leaf.size for path, leaf in leaves if where(path, leaf)]
        everything = jnp.concatenate([jnp.abs(leaf).reshape(-1) for path, leaf in leaves
                                      if where(path, leaf)])
        kept = top_k_mask(everything, int(round((1 - sparsity) * everything.size)))
        pieces = dict(zip(selected, jnp.split(kept, np.cumsum(sizes)[:-1])))
        return _map_selected(lambda name, w: _never_empty(name, w, pieces[name].reshape(w.shape)),
                             params, where)

    def per_layer(name, w):
        s = sparsity.get(name, 0.0) if isinstance(sparsity, Mapping) else sparsity
        return _never_empty(name, w, top_k_mask(jnp.abs(w), int(round((1 - s) * w.size))))

    return _map_selected(per_layer, params, where)


def count_masks(params, counts: Mapping[str, int], where: LeafFilter = is_kernel):
    """Keeps exactly ``counts[layer]`` largest-magnitude weights of each listed layer.

    This is Net-Trim's baseline: magnitude pruning to the per-layer nonzero count another method
    reached. Layers not listed stay dense.
    """
    def per_layer(name, w):
        if name not in counts:
            return jnp.ones(w.shape, bool)
        if not 0 <= counts[name] <= w.size:
            raise ValueError(f"count for {name} must be in [0, {w.size}], got {counts[name]}.")
        return top_k_mask(jnp.abs(w), int(counts[name]))
    return _map_selected(per_layer, params, where)


def group_masks(params, *, threshold: float | None = None,
                fraction_of_max: float | None = None, std_scale: float | None = None,
                grouping: str = "both", where: LeafFilter = is_kernel,
                groupings: Mapping[str, tuple] | None = None):
    """Structured pruning: removes whole output and/or input units with a small group norm.

    Exactly one rule, per tensor and grouping: a unit is removed if its group norm is below
    ``threshold`` (absolute, like `threshold_masks`), below ``fraction_of_max`` × the largest
    group norm, or below ``std_scale`` × the standard deviation of the group norms (the
    `std_threshold_masks` rule applied to groups).

    Args:
      grouping: ``"output"`` (neurons / filters: columns of a Dense kernel, last axis of a Conv
        kernel), ``"input"`` (rows / input channels) or ``"both"``.
      groupings: {layer: (per output unit, per input unit)} axes to reduce, for layers whose
        units are other axes (`inspection.unit_groupings`: an attention kernel's heads);
        default `penalties.default_groupings`.
    """
    if grouping not in ("output", "input", "both"):
        raise ValueError(f"grouping must be 'output', 'input' or 'both', got {grouping!r}.")
    rules = {"threshold": threshold, "fraction_of_max": fraction_of_max, "std_scale": std_scale}
    given = {k: v for k, v in rules.items() if v is not None}
    if len(given) != 1:
        raise ValueError(f"Give exactly one of {', '.join(rules)}; got {sorted(given) or 'none'}.")
    (rule, value), = given.items()
    if value < 0:
        raise ValueError(f"{rule} must be >= 0, got {value}.")

    def limit(norms):
        if rule == "threshold":
            return value
        return value * (jnp.max(norms) if rule == "fraction_of_max" else jnp.std(norms))

    def per_layer(name, w):
        output_axes, input_axes = (groupings or {}).get(name) or default_groupings(w.ndim)
        mask = jnp.ones(w.shape, bool)
        for kind, axes in (("output", output_axes), ("input", input_axes)):
            if grouping in (kind, "both"):
                norms = group_norms(w, axes)
                alive = norms >= limit(norms)
                mask = mask & jnp.expand_dims(alive, tuple(axes))
        return _never_empty(name, w, mask)

    return _map_selected(per_layer, params, where, groupings)


def coupled_group_masks(params, groups, output_axes: Mapping[str, int], *,
                        fraction_of_max: float):
    """Removes whole coupled groups (`inspection.coupled_groups`: a residual stream's channel in
    every layer that writes it) whose joint norm (`penalties.coupled_group_squares`) is below
    ``fraction_of_max`` × the largest group's: each member's output slab is masked. All-True
    masks elsewhere."""
    if fraction_of_max < 0:
        raise ValueError(f"fraction_of_max must be >= 0, got {fraction_of_max}.")
    norms = np.sqrt(np.asarray(coupled_group_squares(params, groups, output_axes)))
    dead = {}
    for group, norm in zip(groups, norms):
        if norms.size and norm < fraction_of_max * norms.max():
            for layer, unit in group.members:
                dead.setdefault(layer, []).append(unit)

    def leaf_mask(path, leaf):
        mask = np.ones(np.shape(leaf), bool)
        layer = layer_name(path)
        if layer in dead and leaf_name(path) == "kernel":
            index = [slice(None)] * mask.ndim
            index[output_axes[layer] % mask.ndim] = dead[layer]
            mask[tuple(index)] = False
        return jnp.asarray(mask)

    return jax.tree_util.tree_map_with_path(leaf_mask, params)


def input_unit_masks(params, kept_fraction: float, *, where: LeafFilter = is_kernel,
                     groupings: Mapping[str, tuple] | None = None):
    """Structured pruning to a count: each kernel keeps the ``kept_fraction`` of its input units
    (rows of a Dense kernel, input channels of a Conv kernel, heads of an attention output
    projection given its ``groupings`` as in `group_masks`; at least one) with the largest
    group norms — group-norm (magnitude-of-groups) pruning of the units `nettrim --units`
    removes, at the same count."""
    if not 0 < kept_fraction <= 1:
        raise ValueError(f"kept_fraction must be in (0, 1], got {kept_fraction}.")

    def per_layer(name, w):
        if w.ndim < 2:
            return jnp.ones(w.shape, bool)
        axes = ((groupings or {}).get(name) or default_groupings(w.ndim))[1]
        norms = group_norms(w, axes)
        keep = max(1, int(round(kept_fraction * norms.size)))
        order = jnp.argsort(-norms.reshape(-1), stable=True)
        alive = jnp.zeros(norms.size, bool).at[order[:keep]].set(True).reshape(norms.shape)
        return jnp.broadcast_to(jnp.expand_dims(alive, tuple(axes)), w.shape)

    return _map_selected(per_layer, params, where, groupings)


def apply_masks(params, masks):
    """Zeroes the pruned entries: ``where(mask, param, 0)`` leaf by leaf."""
    if jax.tree.structure(masks) != jax.tree.structure(params):
        raise ValueError("masks must have the same pytree structure as params.")
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)
