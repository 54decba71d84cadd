"""What Net-Trim reads of the calibration set, streamed batch by batch.

A layer's solve reads one of three things of its calibration rows (one row per output position:
an example of a Dense layer, a token, a convolution's output pixel):

- ``GRAM``: the Gram sums of all its rows (`gram.GramStats`) — the linear program of a map whose
  rows are its recorded inputs, solved by a solver that takes ``gram=``; memory O(N² + NM)
  however many rows there are;
- ``ALL``: all its rows (the linear program of a solver that needs rows, a layer with few rows);
- a fixed random subset of at most ``max_rows`` rows (the ReLU program, whose misfit is per
  row, and a convolution's patches).

`gather` fills them in one streamed pass of the model over the calibration inputs, so no layer's
full (P × N) signals are ever held for the Gram form: the calibration set is bounded by time,
not memory. `relative_discrepancy` measures a certificate the same way, from the real forward
passes of two parameter sets, summed over the streamed batches.

With several processes (`jax.distributed`) each one runs the forward passes of its share of
the calibration inputs, and the sums over rows — the Gram sums (so SparseGPT's H and Wanda's
norms too), a certificate's squared errors and norms — are added over processes, the planned
rows concatenated in order (`hoyertrim.distributed`): every process then holds what one process
would have gathered from all the inputs, up to the order of the float64 additions.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from hoyertrim.distributed import concatenate_over_processes, sum_over_processes
from hoyertrim.inspection import LinearMap, Recorder
from hoyertrim.nettrim.gram import GramStats

__all__ = ["ALL", "GRAM", "LayerSignals", "batch_size_for", "compare_outputs", "gather",
           "relative_discrepancy", "row_plan"]

GRAM = "gram"
ALL = "all"

# Bytes of recorded signals one forward batch may produce (inputs and outputs of every map).
_BATCH_BYTES = 64 * 2 ** 20


@dataclasses.dataclass
class LayerSignals:
    """A layer's calibration signals, as its plan asks.

    Attributes:
      rows: P, the layer's calibration rows (examples × rows per example).
      gram: the Gram sums over all P rows (``GRAM`` plan), else None.
      inputs: (r, N) the input rows of the planned rows (float32), else None.
      outputs: (r, M) the trained outputs (pre-activation) of the same rows, else None.
    """

    rows: int
    gram: GramStats | None = None
    inputs: np.ndarray | None = None
    outputs: np.ndarray | None = None


def row_plan(lmap: LinearMap, num_examples: int, *, gram: bool, max_rows: int, key,
             index: int) -> str | np.ndarray:
    """``GRAM`` (when ``gram``: the caller's solver takes the layer in Gram form), ``ALL``, or
    the sorted indices of a random subset of ``max_rows`` of the layer's rows."""
    if gram:
        return GRAM
    num_rows = num_examples * lmap.rows_per_example
    if num_rows <= max_rows:
        return ALL
    return np.sort(np.asarray(jax.random.choice(jax.random.fold_in(key, index), num_rows,
                                                (max_rows,), replace=False)))


def batch_size_for(maps: Sequence[LinearMap], budget: int = _BATCH_BYTES,
                   largest: int = 1000) -> int:
    """Examples per forward batch so that recording all ``maps`` stays within ``budget`` bytes
    (float32; a convolution's input counted as its patches, an upper bound)."""
    per_example = 4 * sum(m.rows_per_example * (m.num_inputs + m.num_outputs) for m in maps)
    return int(max(1, min(largest, budget // max(per_example, 1))))


def _is_gram(plan) -> bool:
    return isinstance(plan, str) and plan == GRAM


def _local(plan, start: int, stop: int):
    """The plan's rows in [start, stop), relative to start (None: all of them)."""
    if isinstance(plan, str):
        return None
    lo, hi = np.searchsorted(plan, [start, stop])
    return plan[lo:hi] - start


def gather(record: Recorder, maps: Mapping[str, LinearMap], plans: Mapping, images, params, *,
           input_params=None) -> dict[str, LayerSignals]:
    """Each map's `LayerSignals` over ``images``, in one streamed pass.

    Args:
      record: the model's `Recorder`.
      maps: ``{name: LinearMap}`` to gather.
      plans: ``{name: GRAM | ALL | row indices}`` (`row_plan`).
      images: (P_examples, ...) calibration inputs.
      params: the network whose map outputs are the targets (the trained one).
      input_params: the network whose map inputs are recorded (the cascade's pruned one);
        default ``params``.
    """
    names = list(maps)
    signals = {n: LayerSignals(rows=len(images) * maps[n].rows_per_example) for n in names}
    parts: dict[str, tuple[list, list]] = {n: ([], []) for n in names}
    targets = record.batches(params, images, names, share=True)
    pairs = ((t, t) for t in targets) if input_params is None else zip(
        targets, record.batches(input_params, images, names, share=True))
    for (start, _, target), (_, _, source) in pairs:
        for name in names:
            lmap, plan = maps[name], plans[name]
            z = target[name][1]
            if _is_gram(plan):
                x = lmap.input_rows(source[name][0])
                if signals[name].gram is None:
                    signals[name].gram = GramStats.zeros(x.shape[1], z.shape[1])
                signals[name].gram.add(x, z)
                continue
            rows = _local(plan, start * lmap.rows_per_example,
                          start * lmap.rows_per_example + len(z))
            parts[name][0].append(lmap.input_rows(source[name][0], rows))
            parts[name][1].append(z if rows is None else z[rows])
    for name in names:
        if _is_gram(plans[name]):
            signals[name].gram = _summed(signals[name].gram, maps[name])
        else:
            signals[name].inputs = _rows(parts[name][0], np.float32)
            signals[name].outputs = _rows(parts[name][1])
    return signals


def _rows(parts: list, dtype=None) -> np.ndarray:
    """This process's planned rows, then every process's in order."""
    rows = np.concatenate(parts)
    return concatenate_over_processes(rows if dtype is None else rows.astype(dtype))


def _summed(gram: GramStats | None, lmap: LinearMap) -> GramStats:
    """The Gram sums over every process's rows (a process may have had none)."""
    gram = gram or GramStats.zeros(lmap.num_inputs, lmap.num_outputs)
    return GramStats(sum_over_processes(gram.gram), sum_over_processes(gram.cross),
                     sum_over_processes(gram.y_squares),
                     int(sum_over_processes(np.int64(gram.rows))))


def relative_discrepancy(record: Recorder, maps: Mapping[str, LinearMap], plans: Mapping,
                         images, reference, candidate,
                         quantity: Callable[[str, np.ndarray], np.ndarray]
                         ) -> dict[str, float]:
    """Per map, ‖q(ẑ) − q(z)‖_F / ‖q(z)‖_F over the rows its plan names (``GRAM``, ``ALL``:
    every row), ẑ from ``candidate``'s real forward pass and z from ``reference``'s, summed in
    float64 over the streamed batches. ``quantity(name, z)`` is what the certificate bounds."""
    names = list(maps)
    errors = dict.fromkeys(names, 0.0)
    norms = dict.fromkeys(names, 0.0)
    for (start, _, old), (_, _, new) in zip(record.batches(reference, images, names, share=True),
                                            record.batches(candidate, images, names, share=True)):
        for name in names:
            per_example = maps[name].rows_per_example
            z_old, z_new = old[name][1], new[name][1]
            rows = _local(plans[name], start * per_example, start * per_example + len(z_old))
            if rows is not None:
                z_old, z_new = z_old[rows], z_new[rows]
            q_old = quantity(name, z_old)
            errors[name] += float(np.square(quantity(name, z_new) - q_old).sum())
            norms[name] += float(np.square(q_old).sum())
    errors = dict(zip(names, sum_over_processes(np.array([errors[n] for n in names]))))
    norms = dict(zip(names, sum_over_processes(np.array([norms[n] for n in names]))))
    return {n: float(np.sqrt(errors[n] / norms[n])) if norms[n] > 0 else float(np.sqrt(errors[n]))
            for n in names}


def compare_outputs(record: Recorder, images, reference, candidate) -> dict[str, float]:
    """The model outputs' relative error ‖out − ref‖_F / ‖ref‖_F and, for outputs with a class
    axis, the fraction of argmax predictions that agree, streamed over ``images``."""
    error = norm = agree = count = 0.0
    classes = False
    for (_, ref, _), (_, out, _) in zip(record.batches(reference, images, share=True),
                                        record.batches(candidate, images, share=True)):
        ref, out = ref.astype(np.float64), out.astype(np.float64)
        error += float(np.square(out - ref).sum())
        norm += float(np.square(ref).sum())
        if out.ndim >= 2 and out.shape[-1] > 1:
            classes = True
            agree += float(np.sum(np.argmax(out, -1) == np.argmax(ref, -1)))
            count += float(np.prod(out.shape[:-1]))
    error, norm, agree, count = (float(v) for v in sum_over_processes(
        np.array([error, norm, agree, count])))
    classes = bool(sum_over_processes(np.int64(classes)))
    result = {"logits_relative_error": float(np.sqrt(error / norm)) if norm > 0
              else float(np.sqrt(error))}
    if classes:
        result["top1_agreement"] = agree / count
    return result
