"""Net-Trim's linear program in Gram form vs its row form vs SparseGPT, on a trained GPT's layers.

    python benchmarks/nettrim_gram.py --dense runs/pipeline/train-gpt-… --windows 128 \
        --json results/nettrim_gram.json

``--dense`` is the GPT's training stage (`experiments/run.py gpt_*`). Everything is measured in
this one run, one layer at a time, on the same calibration rows (``--windows`` training windows
of 128 bytes: one row per byte position): each layer's inputs X (P × N) and trained outputs Z are
recorded from the real forward pass, then

- Net-Trim, kept-fraction mode (``--kept-fraction``), in row form (FISTA on X) and in Gram form
  (G = XᵀX, C = XᵀZ; `hoyertrim.nettrim.gram`), each from the same settings, timed end to end
  (the Gram form's time includes accumulating G and C);
- SparseGPT at the same kept fraction (its time includes forming H = XᵀX);

and the discrepancy ‖XU + b − Z‖_F / ‖Z‖_F each reaches on these rows. Each solve is run twice
and the second time reported (the first compiles). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import hoyertrim  # noqa: E402
from hoyertrim.data import load_dataset  # noqa: E402
from hoyertrim.inspection import record_maps  # noqa: E402
from hoyertrim import peers  # noqa: E402
from hoyertrim.nettrim import solve_layer  # noqa: E402
from hoyertrim.nettrim.gram import row_misfit  # noqa: E402


def _timed(fn):
    fn()  # compile
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def _discrepancy(x, z, kernel, bias) -> float:
    return float(np.sqrt(row_misfit(x, z, kernel, bias)) / np.linalg.norm(z.astype(np.float64)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dense", required=True, help="the GPT's training stage directory")
    parser.add_argument("--layers", nargs="+", default=["block0/mlp_in", "block0/attn/query"])
    parser.add_argument("--windows", type=int, default=128, help="calibration windows")
    parser.add_argument("--kept-fraction", type=float, default=0.5)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    loaded = hoyertrim.load(args.dense)
    data = load_dataset(loaded.manifest["dataset"], args.data_dir)
    windows = data.train.images[:args.windows]
    maps = record_maps(loaded.model, {"params": loaded.params, **loaded.model_state}, windows)
    print(f"{args.dense}: {args.windows} windows, backend={jax.default_backend()}, "
          f"{platform.node()}, {datetime.datetime.now().isoformat(timespec='minutes')}",
          flush=True)
    header = (f"{'layer':<20} {'N×M':>9} {'P':>7} {'method':<16} {'seconds':>8} {'kept':>7} "
              f"{'discrepancy':>11}")
    print(header)
    runs = []
    for name in args.layers:
        x, z, lmap = maps[name]
        kernel, bias = lmap.matrix(loaded.params), lmap.bias(loaded.params)
        common = dict(kept_fraction=args.kept_fraction, relu=False, fit_bias=bias is not None)
        methods = {
            "nettrim rows": lambda: solve_layer(x, z, form="rows", **common),
            "nettrim gram": lambda: solve_layer(x, z, form="gram", **common),
            "sparsegpt": lambda: peers.sparsegpt_layer(x, z, trained_kernel=kernel,
                                                       trained_bias=bias, **common),
        }
        for method, solve in methods.items():
            solution, seconds = _timed(solve)
            discrepancy = _discrepancy(x, z, solution.kernel, solution.bias)
            row = {"layer": name, "inputs": lmap.num_inputs, "outputs": lmap.num_outputs,
                   "rows": int(len(x)), "method": method, "seconds": seconds,
                   "kept_fraction": float(np.count_nonzero(solution.kernel) / kernel.size),
                   "discrepancy": discrepancy}
            runs.append(row)
            print(f"{name:<20} {lmap.num_inputs:>4}×{lmap.num_outputs:<4} {len(x):>7} "
                  f"{method:<16} {seconds:>8.2f} {row['kept_fraction']:>7.4f} "
                  f"{discrepancy:>11.4f}", flush=True)
        by = {r["method"]: r["seconds"] for r in runs if r["layer"] == name}
        print(f"{name}: Gram form {by['nettrim rows'] / by['nettrim gram']:.1f}x faster than "
              f"the row form; Net-Trim (Gram) / SparseGPT time "
              f"{by['nettrim gram'] / by['sparsegpt']:.2f}", flush=True)
    if args.json:
        payload = {"command": "python benchmarks/nettrim_gram.py " + " ".join(
            argv if argv is not None else sys.argv[1:]), "dense": args.dense,
            "windows": args.windows, "backend": jax.default_backend(),
            "machine": platform.node(), "date": datetime.date.today().isoformat(),
            "runs": runs}
        pathlib.Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
