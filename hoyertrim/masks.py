"""Pruning masks: boolean pytrees shaped like params (True = weight kept).

Rules: `threshold_masks` (|w| ≥ t), `std_threshold_masks` (|w| ≥ s·std(w) per tensor, DeepHoyer's
MNIST rule), `magnitude_masks` (target sparsity per layer or global), `group_masks` (structured:
whole output/input units whose norm falls below a threshold). Only leaves selected by ``where``
(default: Dense/Conv kernels) are pruned; other leaves get all-True masks.

A rule that would remove every weight of a layer keeps that layer's largest-magnitude weight (or
group) and warns, so the network is never silently disconnected.

`sparsity_report` gives per-layer kept weights, kept fraction, alive units, compression and the
forward FLOPs of the dense and the pruned network.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hoyertrim.penalties import default_groupings, group_norms, is_kernel, selected_leaves
from hoyertrim.inspection import inspect_model
from hoyertrim.trees import layer_name, leaf_name, path_string

LeafFilter = Callable[[tuple, jax.Array], bool]


def _map_selected(fn: Callable[[str, jax.Array], jax.Array], params, where: LeafFilter):
    """Applies ``fn(layer, leaf)`` to selected leaves; all-True masks elsewhere. The masks have
    the structure of ``params`` (linen params, NNX ``State``, any pytree); a filter that selects
    no leaf is an error (the masks would silently keep everything)."""
    selected_leaves(params, where, "mask rule")

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
                grouping: str = "both", where: LeafFilter = is_kernel):
    """Structured pruning: removes whole output and/or input units with a small group norm.

    Exactly one rule, per tensor and grouping: a unit is removed if its group norm is below
    ``threshold`` (absolute, like `threshold_masks`), below ``fraction_of_max`` × the largest
    group norm, or below ``std_scale`` × the standard deviation of the group norms (the
    `std_threshold_masks` rule applied to groups).

    Args:
      grouping: ``"output"`` (neurons / filters: columns of a Dense kernel, last axis of a Conv
        kernel), ``"input"`` (rows / input channels) or ``"both"``.
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
        output_axes, input_axes = default_groupings(w.ndim)
        mask = jnp.ones(w.shape, bool)
        for kind, axes, kept_axis in (("output", output_axes, -1), ("input", input_axes, -2)):
            if grouping in (kind, "both"):
                norms = group_norms(w, axes)
                alive = norms >= limit(norms)
                shape = [1] * w.ndim
                shape[kept_axis] = w.shape[kept_axis]
                mask = mask & alive.reshape(shape)
        return _never_empty(name, w, mask)

    return _map_selected(per_layer, params, where)


def input_unit_masks(params, kept_fraction: float, *, where: LeafFilter = is_kernel):
    """Structured pruning to a count: each kernel keeps the ``kept_fraction`` of its input units
    (rows of a Dense kernel, input channels of a Conv kernel; at least one) with the largest
    group norms — group-norm (magnitude-of-groups) pruning of the units `nettrim --units`
    removes, at the same count."""
    if not 0 < kept_fraction <= 1:
        raise ValueError(f"kept_fraction must be in (0, 1], got {kept_fraction}.")

    def per_layer(name, w):
        if w.ndim < 2:
            return jnp.ones(w.shape, bool)
        norms = group_norms(w, default_groupings(w.ndim)[1])
        keep = max(1, int(round(kept_fraction * norms.shape[0])))
        order = jnp.argsort(-norms, stable=True)
        alive = jnp.zeros(norms.shape, bool).at[order[:keep]].set(True)
        shape = [1] * w.ndim
        shape[-2] = w.shape[-2]
        return jnp.broadcast_to(alive.reshape(shape), w.shape)

    return _map_selected(per_layer, params, where)


def polynomial_sparsity(step, final_sparsity: float, begin_step: int, end_step: int,
                        initial_sparsity: float = 0.0, power: float = 3.0):
    """Zhu & Gupta (2017) gradual pruning schedule.

    s(t) = s_f + (s_i − s_f)·(1 − (t − t₀)/(t₁ − t₀))^power for t₀ ≤ t ≤ t₁, s_i before t₀ and
    s_f after t₁. Works on Python numbers and traced arrays alike.
    """
    if end_step <= begin_step:
        raise ValueError(f"end_step ({end_step}) must be greater than begin_step ({begin_step}).")
    progress = jnp.clip((step - begin_step) / (end_step - begin_step), 0.0, 1.0)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** power


def apply_masks(params, masks):
    """Zeroes the pruned entries: ``where(mask, param, 0)`` leaf by leaf."""
    if jax.tree.structure(masks) != jax.tree.structure(params):
        raise ValueError("masks must have the same pytree structure as params.")
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


@dataclasses.dataclass
class LayerReport:
    """Sparsity of one Dense/Conv layer (counts are of kernel weights; biases are not pruned)."""

    name: str
    shape: tuple[int, ...]
    weights: int
    kept_weights: int
    kept_fraction: float
    inputs_alive: int
    inputs: int
    outputs_alive: int
    outputs: int
    dense_flops: int
    sparse_flops: int
    structured_flops: int
    details: dict = dataclasses.field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """1 − kept fraction."""
        return 1.0 - self.kept_fraction


@dataclasses.dataclass
class SparsityReport:
    """Per-layer `LayerReport`s plus totals.

    FLOPs are per example, 2 per multiply-add of the kernels: ``dense_flops`` of the unpruned
    network, ``sparse_flops`` counting only nonzero weights (a sparse kernel), and
    ``structured_flops`` of the smaller dense network left after removing dead input and output
    units (what a structured method like Group-HS saves without sparse kernels).

    This is the one report of a pruned network, whatever pruned it: a method adds what it knows
    about each layer to `LayerReport.details` (Net-Trim: the program, certified and measured
    discrepancy, …) and about the whole network to ``details``. Layers are in call order when
    the model is known.
    """

    layers: list[LayerReport]
    details: dict = dataclasses.field(default_factory=dict)

    @property
    def weights(self) -> int:
        return sum(layer.weights for layer in self.layers)

    @property
    def kept_weights(self) -> int:
        return sum(layer.kept_weights for layer in self.layers)

    @property
    def kept_fraction(self) -> float:
        return self.kept_weights / self.weights

    @property
    def sparsity(self) -> float:
        """1 − kept fraction."""
        return 1.0 - self.kept_fraction

    @property
    def compression(self) -> float:
        """Total weights / nonzero weights."""
        return self.weights / max(self.kept_weights, 1)

    def flops(self, kind: str = "dense") -> int:
        return sum(getattr(layer, f"{kind}_flops") for layer in self.layers)

    @property
    def architecture(self) -> str:
        """Alive units as in the literature: filters of conv layers, inputs of dense layers."""
        return "-".join(str(l.outputs_alive if len(l.shape) == 4 else l.inputs_alive)
                        for l in self.layers)

    def as_dict(self) -> dict:
        return {"layers": [{**dataclasses.asdict(l), "sparsity": l.sparsity}
                           for l in self.layers],
                "weights": self.weights, "kept_weights": self.kept_weights,
                "kept_fraction": self.kept_fraction, "sparsity": self.sparsity,
                "compression": self.compression, "details": self.details,
                "architecture": self.architecture, "dense_flops": self.flops("dense"),
                "sparse_flops": self.flops("sparse"),
                "structured_flops": self.flops("structured")}

    def markdown(self) -> str:
        rows = ["| layer | shape | kept / weights | kept % | inputs alive | outputs alive | "
                "FLOPs dense | FLOPs sparse | FLOPs structured |",
                "|---|---|---|---|---|---|---|---|---|"]
        for l in self.layers:
            rows.append(f"| {l.name} | {'x'.join(map(str, l.shape))} | {l.kept_weights:,} / "
                        f"{l.weights:,} | {100 * l.kept_fraction:.2f} | {l.inputs_alive}/{l.inputs}"
                        f" | {l.outputs_alive}/{l.outputs} | {l.dense_flops:,} | "
                        f"{l.sparse_flops:,} | {l.structured_flops:,} |")
        rows.append(f"| total | | {self.kept_weights:,} / {self.weights:,} | "
                    f"{100 * self.kept_fraction:.2f} | | | {self.flops('dense'):,} | "
                    f"{self.flops('sparse'):,} | {self.flops('structured'):,} |")
        return "\n".join(rows) + (f"\n\nCompression {self.compression:.1f}x, alive units "
                                  f"{self.architecture}.\n")


def _map_layer(name: str, w: np.ndarray, lmap) -> LayerReport:
    """A linear map's report, counted on its (N, M) matrix: input units are the features (a
    conv's channels) its rows read, FLOPs 2 per multiply-add per output row."""
    matrix = lmap.matrix_of(w)
    support = lmap.support()
    support = np.ones(matrix.shape, bool) if support is None else support
    nonzero = matrix != 0
    units = lmap.input_units
    num_units = int(units.max()) + 1
    unit_alive = np.zeros(num_units, bool)
    np.logical_or.at(unit_alive, units, nonzero.any(axis=1))
    alive_outputs = nonzero.any(axis=0)
    rows_alive = unit_alive[units]
    reps = lmap.rows_per_example
    return LayerReport(
        name=name, shape=tuple(w.shape), weights=int(w.size), kept_weights=int(nonzero.sum()),
        kept_fraction=float(np.count_nonzero(w) / w.size), inputs_alive=int(unit_alive.sum()),
        inputs=num_units, outputs_alive=int(alive_outputs.sum()), outputs=matrix.shape[1],
        dense_flops=2 * int(support.sum()) * reps, sparse_flops=2 * int(nonzero.sum()) * reps,
        structured_flops=2 * int(support[rows_alive][:, alive_outputs].sum()) * reps)


def _layout_layer(name: str, w: np.ndarray) -> LayerReport:
    """A kernel's report from its Flax layout alone (Dense (I, O), Conv (…, I, O)), applied
    once per example: what is known without the model."""
    nonzero = w != 0
    inputs_alive = int(np.any(nonzero, axis=tuple(a for a in range(w.ndim) if a != w.ndim - 2)
                              ).sum())
    outputs_alive = int(np.any(nonzero, axis=tuple(range(w.ndim - 1))).sum())
    receptive = math.prod(w.shape[:-2])
    return LayerReport(
        name=name, shape=tuple(w.shape), weights=int(w.size), kept_weights=int(nonzero.sum()),
        kept_fraction=float(nonzero.mean()), inputs_alive=inputs_alive, inputs=w.shape[-2],
        outputs_alive=outputs_alive, outputs=w.shape[-1], dense_flops=2 * w.size,
        sparse_flops=2 * int(nonzero.sum()),
        structured_flops=2 * receptive * inputs_alive * outputs_alive)


def sparsity_report(params, model=None, input_shape=None, *,
                    model_state: Mapping | None = None, apply_kwargs: Mapping | None = None,
                    where: LeafFilter = is_kernel, sample=None) -> SparsityReport:
    """Per-layer sparsity of ``params`` (zeros count as pruned).

    Args:
      params: (pruned) params: linen params, an NNX ``State`` or any pytree.
      model, input_shape: the model (linen module, NNX module or a function ``apply(params,
        x)``) and one example's input shape (or ``sample``, a batch of inputs, e.g. token ids):
        the layers are then the model's linear maps in the order its computation runs them,
        with FLOPs counted from each contraction (rows per example × its matrix: a conv's
        positions, a sequence's tokens, every head of an attention projection). Without them
        layers come in the tree's order and a kernel counts as a Dense/Conv layout applied once
        per example (right for MLPs).
      model_state: a linen model's other collections (e.g. batch_stats), for tracing.
      apply_kwargs: keyword arguments each call of the model needs (e.g. ``{"train": False}``).
      where: the leaves reported (default: kernels).

    Raises:
      ValueError: ``where`` selects no leaf (a report with no layers).
    """
    maps = {}
    if model is not None:
        if sample is None:
            sample = jnp.zeros((1, *input_shape), jnp.float32)
        variables = {"params": params, **model_state} if model_state else params
        found = inspect_model(model, variables, sample, apply_kwargs=apply_kwargs)
        maps = {m.path: m for m in found.maps}
    layers = []
    for path, w in selected_leaves(params, where, "sparsity_report"):
        lmap = maps.get(path_string(path))
        w = np.asarray(w)
        name = layer_name(path)
        layers.append(_map_layer(name, w, lmap) if lmap is not None else _layout_layer(name, w))
    order = {m.name: i for i, m in enumerate(maps.values())}
    layers.sort(key=lambda layer: order.get(layer.name, len(order)))
    return SparsityReport(layers)
