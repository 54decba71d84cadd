"""Compaction benchmark: bytes on disk and inference latency, dense vs pruned vs compact.

    python benchmarks/compaction.py --dense runs/lenet5/dense --pruned runs/lenet5/ghs-ft3

``--dense`` and ``--pruned`` are stage directories of the ``hoyertrim`` command or checkpoint
directories (`hoyertrim.load` finds the best checkpoint). Everything below is measured in this
one run on the same inputs:

- bytes: the dense params (np.savez), the pruned params with their zeros (np.savez_compressed),
  the compact model (`compact.save_compact`);
- latency: median wall time at batch 1 and batch 256 (``--batches``; test images of the stage's
  dataset), after a warm-up, of the
  dense model as trained (``model.apply``), of the dense model run by the compact engine (the
  like-for-like baseline: `compact.compact` of the unpruned network, the same per-layer
  kernels), and of the compact model; and the structured-FLOPs ratio (dense FLOPs over those
  of the dense kernels of the surviving units) they are compared with.
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import hoyertrim  # noqa: E402
from hoyertrim import compact as compact_lib  # noqa: E402
from hoyertrim.data import load_dataset  # noqa: E402
from hoyertrim.inspection import inspect_model  # noqa: E402
from hoyertrim.masks import sparsity_report  # noqa: E402
from hoyertrim.models import create_model  # noqa: E402


def _npz_bytes(params, compressed: bool) -> int:
    buffer = io.BytesIO()
    leaves = {f"a{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(params))}
    (np.savez_compressed if compressed else np.savez)(buffer, **leaves)
    return buffer.getbuffer().nbytes


def _median_seconds(fn, x, repeats: int) -> float:
    jax.block_until_ready(fn(x))  # compile and warm up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="zoo model of plain checkpoint directories (stage directories "
                             "name their own)")
    parser.add_argument("--dense", required=True, help="dense stage or checkpoint directory")
    parser.add_argument("--pruned", required=True, help="pruned stage or checkpoint directory")
    parser.add_argument("--data-dir", default=None, help="data root holding the stage's data")
    parser.add_argument("--dataset", default=None,
                        help="test images of this dataset (default: the stage's, else mnist)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256],
                        help="batch sizes to time")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per measurement")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    dense_loaded = hoyertrim.load(args.dense)
    pruned_loaded = hoyertrim.load(args.pruned)
    model = pruned_loaded.model or (create_model(args.model) if args.model else None)
    if model is None:
        raise SystemExit("Pass --model: these checkpoint directories do not name their model.")
    dense, pruned = dense_loaded.params, pruned_loaded.params
    dense_vars = {"params": dense, **dense_loaded.model_state}
    pruned_vars = {"params": pruned, **pruned_loaded.model_state}
    dataset = args.dataset or (pruned_loaded.manifest or {}).get("dataset") or "mnist"
    test = load_dataset(dataset, args.data_dir).test
    compacted = compact_lib.compact(model, pruned_vars, test.images[:1])
    # The dense model through the same engine (nothing to remove): the like-for-like baseline.
    dense_engine = compact_lib.compact(model, dense_vars, test.images[:1])
    expected = model.apply(pruned_vars, test.images[:256])
    error = float(np.max(np.abs(np.asarray(compacted.apply(test.images[:256])) - expected)))
    with tempfile.TemporaryDirectory() as tmp:
        path = compact_lib.save_compact(tmp, compacted)
        compact_bytes = (path / "compact.npz").stat().st_size + (path / "compact.json").stat(
        ).st_size
    report = sparsity_report(pruned, model, test.images.shape[1:],
                             model_state=pruned_loaded.model_state)
    flops_ratio = report.flops("dense") / report.flops("structured")
    # What the compact model computes: each compact kernel once per output row of its map.
    rows = {m.name: m.rows_per_example for m in inspect_model(
        model, pruned_vars, test.images[:1]).maps}
    compact_flops = sum(2 * rows[name] * int(np.size(layer.kernel))
                        for name, layer in compacted.layers.items())
    compact_ratio = report.flops("dense") / compact_flops
    dense_apply = jax.jit(lambda x: model.apply(dense_vars, x))
    print(f"{type(model).__name__}: pruned checkpoint {args.pruned}")
    print(f"  kept fraction {report.kept_fraction:.4f}, alive units {report.architecture}, "
          f"structured FLOPs ratio {flops_ratio:.2f}x (the compact kernels': "
          f"{compact_ratio:.2f}x); compact vs pruned max |Δlogit| {error:.2e}")
    sizes = {"dense": _npz_bytes(dense, False), "pruned_compressed": _npz_bytes(pruned, True),
             "compact": compact_bytes}
    print(f"  bytes: dense {sizes['dense']:,}  pruned (compressed npz) "
          f"{sizes['pruned_compressed']:,}  compact {sizes['compact']:,}")
    record = {"model": type(model).__name__, "dense": str(args.dense), "pruned": str(args.pruned),
              "dataset": dataset, "kept_fraction": report.kept_fraction,
              "architecture": str(report.architecture), "flops_ratio": flops_ratio,
              "compact_flops_ratio": compact_ratio,
              "max_abs_logit_error": error, "bytes": sizes, "latency": [],
              "machine": f"{jax.default_backend()}, {jax.devices()[0].device_kind}, "
                         f"{jax.device_count()} device(s), jax {jax.__version__}",
              "date": time.strftime("%Y-%m-%d")}
    for batch in args.batches:
        x = test.images[:batch]
        t_dense = _median_seconds(dense_apply, x, args.repeats)
        t_engine = _median_seconds(dense_engine.apply, x, args.repeats)
        t_compact = _median_seconds(compacted.apply, x, args.repeats)
        record["latency"].append({"batch": batch, "dense_seconds": t_dense,
                                  "dense_engine_seconds": t_engine,
                                  "compact_seconds": t_compact,
                                  "speedup": t_dense / t_compact,
                                  "fraction_of_flops_ratio": t_dense / t_compact / flops_ratio,
                                  "fraction_of_compact_flops_ratio":
                                      t_dense / t_compact / compact_ratio})
        print(f"  batch {batch:>4}: dense as trained {1e3 * t_dense:.3f} ms, dense through the "
              f"compact engine {1e3 * t_engine:.3f} ms, compact {1e3 * t_compact:.3f} ms -> "
              f"speed-up {t_dense / t_compact:.2f}x ({t_dense / t_compact / flops_ratio:.2f} of "
              f"the structured FLOPs ratio, {t_dense / t_compact / compact_ratio:.2f} of the "
              f"compact kernels'); same engine {t_engine / t_compact:.2f}x "
              f"({t_engine / t_compact / flops_ratio:.2f})")
    print(f"  {record['machine']}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
