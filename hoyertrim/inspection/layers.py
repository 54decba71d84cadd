"""A model's prunable layers and their signals, for any kind of model.

`inspect_model` traces the model once on a sample and returns an `Inspection`: its linear maps
(`linear_maps.LinearMap`), the parameters that are not maps (with the reason) and, for each map,
what follows its output (`graph.Follower`: which Net-Trim program certifies it). `Recorder` runs
the model in batches and records each map's data operand and output from the real forward pass.
`contraction_filter` turns the found maps into a leaf filter for penalties and mask rules.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hoyertrim.distributed import process_share
from hoyertrim.inspection import graph
from hoyertrim.inspection.computation import Computation, as_computation
from hoyertrim.inspection.coupling import CoupledGroup, coupled_groups
from hoyertrim.inspection.linear_maps import LinearMap, Refusal, find_linear_maps, locate
from hoyertrim.inspection.program import Program
from hoyertrim.trees import path_string

__all__ = ["Inspection", "Recorder", "contraction_filter", "inspect_model", "record_maps"]


@dataclasses.dataclass
class Inspection:
    """What `inspect_model` found.

    Attributes:
      computation: the model as ``apply(params, x)``.
      maps: the linear maps, in the order the computation runs them.
      refusals: parameters of ndim ≥ 2 that are not prunable maps, with the reason.
      followers: ``{map name: Follower}``: what follows each map's output.
      coupled: the groups of output units of several maps removable only together
        (`coupling.coupled_groups`: a residual stream's channels).
    """

    computation: Computation
    maps: list[LinearMap]
    refusals: list[Refusal]
    followers: dict[str, graph.Follower]
    coupled: list[CoupledGroup] = dataclasses.field(default_factory=list)

    def by_name(self) -> dict[str, LinearMap]:
        return {m.name: m for m in self.maps}


def inspect_model(model=None, variables=None, sample=None, *, apply_kwargs: Mapping | None = None,
                  computation: Computation | None = None) -> Inspection:
    """Traces ``model`` on ``sample`` (a few inputs; two are enough) and finds its linear maps.

    Args:
      model, variables, apply_kwargs: as `as_computation` takes them (linen module + variables,
        NNX module (+ State), or a function + params); or pass ``computation`` instead.
      sample: (B, ...) example inputs (only their shapes and the params' values are used).
    """
    if computation is None:
        computation = as_computation(model, variables, apply_kwargs=apply_kwargs)
    params = computation.params
    closed = jax.make_jaxpr(computation.apply)(params, sample)
    leaves = jax.tree.leaves(params)
    program = Program(closed, dict(enumerate(leaves)))
    batch = int(np.shape(jax.tree.leaves(sample)[0])[0])
    maps, refusals, located = find_linear_maps(program, params, batch)
    followers = {m.name: graph.follow(program, located[m.kernel_leaf].output, m.num_outputs,
                                      m.units_trailing) for m in maps}
    outputs = {}
    for m in maps:
        contraction = located[m.kernel_leaf].op.outputs[0]
        shape = program.shapes[contraction]
        if m.units_trailing and shape and shape[-1] == m.num_outputs:
            outputs[m.name] = (contraction, m.num_outputs)
    return Inspection(computation, maps, refusals, followers, coupled_groups(program, outputs))


def contraction_filter(model, variables=None, sample=None, *,
                       apply_kwargs: Mapping | None = None):
    """A leaf filter ``where(path, leaf)`` selecting exactly the kernels of the model's linear
    maps (whatever their names), for `penalties.tree_penalty`, the `masks` rules and the
    `transforms`. Embedding tables, norms and biases are not selected."""
    found = inspect_model(model, variables, sample, apply_kwargs=apply_kwargs)
    paths = {m.path for m in found.maps}
    return lambda path, leaf: path_string(path) in paths


class Recorder:
    """Runs a model in batches and records each map's inputs and output rows.

    The model is traced inside one jitted function per batch shape, and the maps are located
    again in that trace by their kernel leaves, so the original, the pruned and any partly
    pruned params share one compiled function. With several ``devices`` (default: this
    process's) each batch is split over them along its examples (a batch that does not split
    evenly runs on one): the forward passes run data-parallel and the recorded rows come back
    to the host in order.
    """

    def __init__(self, computation: Computation, maps: Sequence[LinearMap],
                 batch_size: int = 1000, devices: Sequence[jax.Device] | None = None):
        self.batch_size = batch_size
        devices = list(jax.local_devices() if devices is None else devices)
        self._split = None if len(devices) < 2 else NamedSharding(
            Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
        self._names = {m.kernel_leaf: m.name for m in maps}
        self._maps = {m.name: m for m in maps}
        apply = computation.apply
        names = self._names

        @jax.jit
        def run(params, x):
            closed = jax.make_jaxpr(apply)(params, x)
            program = Program(closed)
            leaves = jax.tree.leaves(params)
            located, _ = locate(program, len(leaves))
            missing = [names[leaf] for leaf in names if leaf not in located]
            if missing:
                raise ValueError(f"The layers {missing} are no longer linear maps of the model "
                                 f"at input shape {np.shape(x)}.")
            record = [v for leaf in names for v in (located[leaf].data, located[leaf].output)]
            outputs, values = program.run([*leaves, *jax.tree.leaves(x)], record)
            signals = {names[leaf]: (values[located[leaf].data], values[located[leaf].output])
                       for leaf in names}
            return outputs[0], signals

        self._run = run

    def batches(self, params, images, names: Sequence[str] = (), *, share: bool = False):
        """Yields, batch by batch, ``(start, output, {name: (inputs, z)})``: the index of the
        batch's first image, the model's (first) output and each named map's recorded inputs
        (`LinearMap.recorded_input`) and output rows (`LinearMap.output_rows`) — for streaming
        over calibration sets too large to hold. With ``share``, only this process's share of
        the images (`distributed.process_share`; all of them with one process), ``start``
        still counting from the first of all."""
        first, stop = process_share(len(images)) if share else (0, len(images))
        with jax.default_matmul_precision("highest"):
            for start in range(first, stop, self.batch_size):
                batch = images[start:min(start + self.batch_size, stop)]
                if self._split is not None and len(batch) % self._split.mesh.size == 0:
                    batch = jax.device_put(batch, self._split)
                output, layers = self._run(params, batch)
                yield start, np.asarray(output), {
                    name: (self._maps[name].recorded_input(layers[name][0]),
                           self._maps[name].output_rows(layers[name][1])) for name in names}

    def __call__(self, params, images, names: Sequence[str] = ()
                 ) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """The model's (first) output and ``{name: (inputs, z)}`` for ``names`` over all
        ``images``: ``inputs`` as `LinearMap.recorded_input` keeps them (take rows with
        `LinearMap.input_rows`), ``z`` the map's output as (rows, M) (`LinearMap.output_rows`)."""
        outputs, captured = [], {n: ([], []) for n in names}
        for _, output, layers in self.batches(params, images, names):
            outputs.append(output)
            for name, (inputs, z) in layers.items():
                captured[name][0].append(inputs)
                captured[name][1].append(z)
        return (np.concatenate(outputs),
                {n: (np.concatenate(x), np.concatenate(z)) for n, (x, z) in captured.items()})


def record_maps(model, variables, images, *, apply_kwargs: Mapping | None = None,
                batch_size: int = 1000) -> dict[str, tuple[np.ndarray, np.ndarray, LinearMap]]:
    """``{name: (inputs (P, N), outputs (P, M), map)}`` of every linear map over ``images``, in
    the order the computation runs them: each output row (a conv's position, a token) with the
    input row (patch, features) it was computed from, before any activation."""
    found = inspect_model(model, variables, np.asarray(images)[:2], apply_kwargs=apply_kwargs)
    recorder = Recorder(found.computation, found.maps, batch_size)
    names = [m.name for m in found.maps]
    _, signals = recorder(found.computation.params, np.asarray(images), names)
    by_name = found.by_name()
    return {n: (by_name[n].input_rows(signals[n][0]), signals[n][1], by_name[n]) for n in names}
