"""Net-Trim on a million calibration rows: the host memory `prune_network` needs, on the GPT.

    python benchmarks/nettrim_memory.py --dense runs/pipeline/train-gpt-… --rows 1000000 \
        --json results/nettrim_memory.json

``--dense`` is the GPT's training stage (`experiments/run.py gpt_*`). In this one process: the
training windows are read, ``--rows`` byte rows (``rows / 128`` windows) are taken as the
calibration set, and `hoyertrim.nettrim.prune_network` prunes ``--layers`` (kept-fraction mode,
parallel scheme, no held-out part) on all of them — the linear program in Gram form, its sums
streamed batch by batch (`hoyertrim.nettrim.calibration`), the certificate measured by streamed
forward passes over every row. Reported: the process's resident memory (``ru_maxrss``, Linux:
KiB) before pruning (Python, JAX, the model, the corpus) and at its peak, what holding the
layers' rows would take, the wall time, and each layer's certificate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import resource
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

import jax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import hoyertrim  # noqa: E402
from hoyertrim import nettrim  # noqa: E402
from hoyertrim.data import load_dataset  # noqa: E402
from hoyertrim.inspection import inspect_model  # noqa: E402


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dense", required=True, help="the GPT's training stage directory")
    parser.add_argument("--layers", nargs="+", default=["block0/mlp_in"])
    parser.add_argument("--rows", type=int, default=1_000_000, help="calibration byte rows")
    parser.add_argument("--kept-fraction", type=float, default=0.5)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    loaded = hoyertrim.load(args.dense)
    data = load_dataset(loaded.manifest["dataset"], args.data_dir)
    context = data.train.images.shape[1]
    windows = data.train.images[:-(-args.rows // context)]
    rows = len(windows) * context
    variables = {"params": loaded.params, **loaded.model_state}
    maps = inspect_model(loaded.model, variables, windows[:2]).by_name()
    held_bytes = sum(rows * (maps[n].num_inputs + maps[n].num_outputs) * 4 for n in args.layers)
    before = _rss_mib()
    print(f"{args.dense}: {rows:,} rows ({len(windows):,} windows), layers {args.layers}, "
          f"backend={jax.default_backend()}, {platform.node()}, "
          f"{datetime.datetime.now().isoformat(timespec='minutes')}", flush=True)
    started = time.perf_counter()
    network = nettrim.prune_network(loaded.model, variables, windows, layers=args.layers,
                                    kept_fraction=args.kept_fraction, heldout=0.0,
                                    progress=False)
    seconds = time.perf_counter() - started
    peak = _rss_mib()
    layers = {name: {key: getattr(network.layers[name], key) for key in (
        "samples", "kept_fraction", "epsilon_certified", "measured", "seconds")}
        for name in args.layers}
    print(f"resident memory: {before:.0f} MiB before pruning, peak {peak:.0f} MiB "
          f"(holding the layers' rows would take {held_bytes / 2 ** 20:.0f} MiB more); "
          f"{seconds:.1f} s", flush=True)
    for name, report in layers.items():
        print(f"  {name}: {report['samples']:,} rows, kept {report['kept_fraction']:.4f}, "
              f"certified ε {report['epsilon_certified']:.4f}, measured {report['measured']:.4f}, "
              f"solve {report['seconds']:.1f} s", flush=True)
    if args.json:
        payload = {"command": "python benchmarks/nettrim_memory.py " + " ".join(
            argv if argv is not None else sys.argv[1:]), "dense": args.dense, "rows": rows,
            "backend": jax.default_backend(), "machine": platform.node(),
            "date": datetime.date.today().isoformat(), "rss_before_mib": before,
            "rss_peak_mib": peak, "rows_bytes_mib": held_bytes / 2 ** 20,
            "seconds": seconds, "layers": layers}
        pathlib.Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
