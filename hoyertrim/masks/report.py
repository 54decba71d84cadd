"""The sparsity report of a (pruned) network: per layer kept weights, kept fraction, alive
units, compression and the forward FLOPs of the dense, the sparse and the structurally smaller
network — counted on the model's own linear maps (`hoyertrim.inspection`) when the model is
given."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from hoyertrim.inspection import inspect_model
from hoyertrim.masks.rules import LeafFilter
from hoyertrim.penalties import is_kernel, selected_leaves
from hoyertrim.trees import layer_name, path_string

__all__ = ["LayerReport", "SparsityReport", "sparsity_report"]


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
