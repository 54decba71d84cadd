"""Net-Trim's kept-fraction mode with and without polish, on LeNet-5's slow layers, in one run.

    python benchmarks/nettrim_kept_fraction.py [--data-dir ../shared/data]
        [--kept-fractions 0.5 0.3] [--layers conv1 dense0] [--json results/...json]

The network: the dense LeNet-5 of `experiments/run.py` (its stage directory; trained if absent).
The layers: those named, pruned alone (parallel scheme: each layer on the trained network's
signals) from the first ``--samples`` training images, the way `prune_network` does it for a user
(conv layers on subsampled patches). Every shape is compiled before the timed solves. For each
kept fraction, each layer is solved by
`solve_layer(kept_fraction=f)` (a λ search to f ± 0.005) and by `solve_layer(kept_fraction=f,
options=SolverOptions(polish=1))` (a loose search to [f, 1.15 f], then cut to the exact count and re-fit), in
alternating order. Printed per solve: wall time, λ solves, FISTA iterations, kept fraction and
the measured discrepancy (post-ReLU, on the calibration images), and the plain / polish time
ratio — every ratio from this run, on the same inputs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys
import warnings

import jax

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))

import common  # noqa: E402
from hoyertrim import nettrim, pipeline  # noqa: E402
from hoyertrim.data import load_dataset  # noqa: E402
from run import DENSE_LENET5  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--samples", type=int, default=5000, help="calibration training images")
    parser.add_argument("--kept-fractions", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--layers", nargs="+", default=["conv1", "dense0"])
    parser.add_argument("--root", default="runs/pipeline", help="where the dense stage is")
    parser.add_argument("--json", default="results/nettrim_kept_fraction_benchmark.json")
    args = parser.parse_args(argv)

    dense_dir = common.dense_stage(DENSE_LENET5[1], root=args.root, data_dir=args.data_dir,
                                   progress=False)
    loaded = pipeline.load(dense_dir)
    images = load_dataset("mnist", args.data_dir).train.images[:args.samples]
    print(f"LeNet-5 from {dense_dir}; {args.samples} calibration images; layers "
          f"{', '.join(args.layers)}; {jax.devices()[0].platform}, {platform.processor() or '?'},"
          f" {datetime.date.today()}", flush=True)
    def prune(name, fraction, polish):
        return nettrim.prune_network(loaded.model, loaded.params, images, scheme="parallel",
                                     layers=[name], kept_fraction=fraction, heldout=0,
                                     progress=False, options=nettrim.SolverOptions(polish=polish))

    # Compile first (every presolve level's solve, the polish's re-fit): one untimed polished
    # solve per layer.
    for name in args.layers:
        prune(name, args.kept_fractions[0], polish=1)
    rows = []
    for fraction in args.kept_fractions:
        for index, name in enumerate(args.layers):
            # Alternate which variant runs first, so drift during the run favours neither.
            variants = [("plain", 0), ("polish=1", 1)]
            for label, polish in variants if index % 2 == 0 else variants[::-1]:
                layer = prune(name, fraction, polish=polish).layers[name]
                rows.append({"kept_fraction_target": fraction, "layer": name, "solver": label,
                             "seconds": layer.seconds, "solves": layer.solves,
                             "iterations": layer.iterations,
                             "kept_fraction": layer.kept_fraction,
                             "discrepancy": layer.measured})
                r = rows[-1]
                print(f"f={fraction:g} {name:7s} {label:9s} {r['seconds']:7.1f} s  "
                      f"{r['solves']:2d} solves  {r['iterations']:6d} iterations  kept "
                      f"{r['kept_fraction']:.4f}  discrepancy {r['discrepancy']:.4f}", flush=True)
            plain, polished = (next(r for r in rows[-2:] if r["solver"] == s)
                               for s in ("plain", "polish=1"))
            print(f"f={fraction:g} {name}: polish {plain['seconds'] / polished['seconds']:.1f}x "
                  f"faster, discrepancy {polished['discrepancy']:.4f} vs "
                  f"{plain['discrepancy']:.4f}", flush=True)
    payload = {"command": "python benchmarks/nettrim_kept_fraction.py", "dense": str(dense_dir),
               "samples": args.samples, "rows": rows,
               "machine": f"{platform.node()} {platform.processor()} "
                          f"{jax.devices()[0].platform}",
               "date": str(datetime.date.today()), "environment": common.environment()}
    pathlib.Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
