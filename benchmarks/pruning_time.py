"""Whole-network pruning time: Net-Trim against SparseGPT on the same model and calibration set.

    python benchmarks/pruning_time.py --dense runs/pipeline/train-gpt-… --samples 128 \
        --json results/pruning_time_gpt.json

``--dense`` is a training stage (the GPT's or the ViT's from `experiments/run.py`). In this one
process, on the same ``--samples`` random training examples (the nettrim stage's draw with
``--seed``) and with no held-out part, `hoyertrim.nettrim.prune_network` prunes every linear map:
Net-Trim cascade in kept-fraction mode with ``polish=2`` and SparseGPT (sequential) at each
``--kept-fraction``, Net-Trim's N:M mode and SparseGPT at 2:4 — each whole call timed (the
calibration pass, the solves, the certificate's forward passes), after one untimed call of each
that compiles. Run it on an otherwise idle machine.
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
from hoyertrim import nettrim  # noqa: E402
from hoyertrim.data import load_dataset  # noqa: E402
from hoyertrim.inspection import inspect_model  # noqa: E402
from hoyertrim import peers  # noqa: E402
from hoyertrim.train import mode_kwargs  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dense", required=True, help="a training stage directory")
    parser.add_argument("--samples", type=int, default=128, help="calibration examples")
    parser.add_argument("--kept-fraction", type=float, nargs="+", default=[0.5])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    loaded = hoyertrim.load(args.dense)
    data = load_dataset(loaded.manifest["dataset"], args.data_dir)
    rng = np.random.default_rng(args.seed)
    calibration = data.train.images[np.sort(rng.choice(len(data.train), args.samples,
                                                       replace=False))]
    variables = {"params": loaded.params, **loaded.model_state}
    apply_kwargs = mode_kwargs(loaded.model, False)
    maps = inspect_model(loaded.model, variables, calibration[:2], apply_kwargs=apply_kwargs)
    nm_layers = [m.name for m in maps.maps if m.num_inputs % 4 == 0]
    common = dict(scheme="cascade", heldout=0.0, progress=False, apply_kwargs=apply_kwargs,
                  key=jax.random.PRNGKey(args.seed))
    runs = {}
    for kept in args.kept_fraction:
        runs[f"nettrim polish {kept:g}"] = dict(kept_fraction=kept,
                                                options=nettrim.SolverOptions(polish=2))
        runs[f"sparsegpt {kept:g}"] = dict(kept_fraction=kept, solver=peers.sparsegpt_layer)
    runs["nettrim 2:4"] = dict(kept_fraction=0.5, nm=(2, 4), solver=nettrim.solve_layer_nm,
                               layers=nm_layers)
    runs["sparsegpt 2:4"] = dict(kept_fraction=0.5, nm=(2, 4), solver=peers.sparsegpt_layer,
                                 layers=nm_layers)
    print(f"{args.dense}: {args.samples} examples, {len(maps.maps)} maps, "
          f"backend={jax.default_backend()}, {platform.node()}, "
          f"{datetime.datetime.now().isoformat(timespec='minutes')}", flush=True)
    results = []
    for label, options in runs.items():
        nettrim.prune_network(loaded.model, variables, calibration, **common, **options)
        started = time.perf_counter()
        network = nettrim.prune_network(loaded.model, variables, calibration, **common,
                                        **options)
        seconds = time.perf_counter() - started
        kept = sum(r.kept_weights for r in network.layers.values()) / sum(
            r.weights for r in network.layers.values())
        results.append({"method": label, "seconds": seconds, "kept_fraction": kept})
        print(f"{label:<22} {seconds:7.1f} s   kept {kept:.3f}", flush=True)
    by = {r["method"]: r["seconds"] for r in results}
    for kept in args.kept_fraction:
        print(f"Net-Trim / SparseGPT time at kept {kept:g}: "
              f"{by[f'nettrim polish {kept:g}'] / by[f'sparsegpt {kept:g}']:.2f}")
    print(f"Net-Trim / SparseGPT time at 2:4: {by['nettrim 2:4'] / by['sparsegpt 2:4']:.2f}")
    if args.json:
        payload = {"command": "python benchmarks/pruning_time.py " + " ".join(
            argv if argv is not None else sys.argv[1:]), "dense": args.dense,
            "samples": args.samples, "backend": jax.default_backend(),
            "machine": platform.node(), "date": datetime.date.today().isoformat(),
            "runs": results}
        pathlib.Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
