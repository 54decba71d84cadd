"""Parallel Net-Trim on several devices: wall time of the layers solved one after another vs
concurrently, one layer per device, in the same run on the same inputs; and whether the pruned
params are identical.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/nettrim_devices.py \
        --dense runs/pipeline/train-lenet300100-2896deca

On a CPU the forced host devices share the machine's cores, so this measures scheduling, not
more hardware: the layers' solves overlap where one alone leaves cores idle. On a machine with
several accelerators each layer gets its own.
"""

from __future__ import annotations

import argparse
import time
import warnings

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import hoyertrim  # noqa: E402
from hoyertrim import nettrim  # noqa: E402
from hoyertrim.data import load_dataset  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dense", required=True, help="dense stage directory")
    parser.add_argument("--epsilon", type=float, default=0.1, help="Net-Trim's ε")
    parser.add_argument("--samples", type=int, default=5000, help="calibration images")
    parser.add_argument("--data-dir", default=None, help="data root holding mnist/")
    args = parser.parse_args(argv)
    loaded = hoyertrim.load(args.dense)
    images = load_dataset(loaded.manifest["dataset"], args.data_dir).train.images[:args.samples]
    devices = jax.devices()
    if len(devices) < 2:
        raise SystemExit("One device only: set XLA_FLAGS=--xla_force_host_platform_device_count=4"
                         " (CPU) or run where several accelerators are visible.")
    times, results = {}, {}
    modes = {  # label: prune_network arguments
        "layers in turn, one device": {"shard": False},
        f"layers in turn, neurons over {len(devices)} devices": {},
        f"layers concurrently, one per device ({len(devices)})": {"devices": devices},
    }
    # A warm-up round (compilation), then a timed round in the same order.
    for _ in range(2):
        for label, options in modes.items():
            started = time.perf_counter()
            results[label] = nettrim.prune_network(loaded.model, loaded.params, images,
                                                   epsilon=args.epsilon, scheme="parallel",
                                                   heldout=0, progress=False, **options)
            times.setdefault(label, []).append(time.perf_counter() - started)
    base, sharded, concurrent = modes
    print(f"{loaded.manifest['model']['spec']}, ε = {args.epsilon}, parallel scheme, "
          f"{args.samples} calibration images, {len(results[base].layers)} layers")
    for label in modes:
        print(f"  {label}: {times[label][1]:.1f} s ({times[base][1] / times[label][1]:.2f}x; "
              f"first call with compilation {times[label][0]:.1f} s), kept "
              f"{results[label].report().kept_fraction:.4f}")
    identical = all(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
        results[base].params, results[concurrent].params)))
    print(f"  concurrent layers give the one-device result exactly: {identical} (sharding one "
          "layer's neurons changes float reductions, so its λ search may end elsewhere)")
    print(f"  devices: {[str(d) for d in devices]}, backend {jax.default_backend()}, "
          f"jax {jax.__version__}")


if __name__ == "__main__":
    main()
