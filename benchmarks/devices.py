"""One device vs N: wall time of a training epoch and of a Net-Trim network, in one run.

    python benchmarks/devices.py --devices 4 --out results/devices.json

Each setting runs in its own process (a process's device count is fixed when JAX starts), one
after the other on the same inputs: LeNet-300-100 on MNIST, the second of two epochs timed
(the first compiles), then Net-Trim (cascade, ε = 0.1) of the trained network on 2,000
training images, timed on its second run. Without accelerators the N devices are forced CPU
devices (``--xla_force_host_platform_device_count``) that share the same cores: the figures
then measure the cost of splitting the work, not more hardware — the output says which.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time


def _worker(count: int, force: bool) -> dict:
    if force:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
    import jax
    import optax

    from hoyertrim.data import load_dataset
    from hoyertrim.models import create_model
    from hoyertrim.nettrim import prune_network
    from hoyertrim.train import fit
    devices = jax.local_devices()[:count]
    data = load_dataset("mnist")
    model = create_model("lenet300100")
    state, history = fit(model, optax.adam(1e-3), data, epochs=2, batch_size=128,
                         progress=False, devices=devices)
    images = data.train.images[:2000]
    variables = {"params": state.params, **state.model_state}
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        network = prune_network(model, variables, images, epsilon=0.1, scheme="cascade",
                                apply_kwargs={"train": False}, progress=False)
        seconds.append(time.perf_counter() - started)
    return {"devices": len(devices), "platform": devices[0].platform,
            "forced_cpu_devices": force and count > 1,
            "epoch_seconds": history[-1]["epoch_seconds"], "nettrim_seconds": seconds[-1],
            "kept_fraction": float(network.report().kept_fraction)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4, help="N, the devices to compare with 1")
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--force", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_worker(args.worker, args.force)))
        return
    import jax
    force = jax.local_devices()[0].platform == "cpu"
    rows = []
    for count in (1, args.devices):
        command = [sys.executable, __file__, "--worker", str(count)] + (["--force"] if force
                                                                        else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    one, many = rows
    result = {"rows": rows, "epoch_speedup": one["epoch_seconds"] / many["epoch_seconds"],
              "nettrim_speedup": one["nettrim_seconds"] / many["nettrim_seconds"],
              "note": ("forced CPU devices sharing the same cores: the cost of splitting, not "
                       "more hardware") if force else "real devices"}
    for row in rows:
        print(f"{row['devices']} {row['platform']} device(s): epoch {row['epoch_seconds']:.2f} s,"
              f" Net-Trim {row['nettrim_seconds']:.2f} s (kept {row['kept_fraction']:.4f})")
    print(f"speed-up on {args.devices}: epoch {result['epoch_speedup']:.2f}x, Net-Trim "
          f"{result['nettrim_speedup']:.2f}x ({result['note']})")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
