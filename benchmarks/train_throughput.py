"""Training throughput (images/s): one-scan epochs vs a naive per-batch loop, same process.

    python benchmarks/train_throughput.py [--data-dir ../shared/data] [--epochs 2]

Also the fraction of the machine's dense matmul rate an epoch reaches: training FLOPs per image
are taken as 3x the forward FLOPs of the kernels (2 per multiply-add, from
`masks.sparsity_report`; LeNet-5 ≈ 4.6 MFLOP forward), and the rate they are divided by is a
1024x1024x1024 float32 matmul's, measured in the same process right before.

The baseline is what a first JAX training loop looks like: a Python loop that shuffles and slices
batches on the host with numpy and calls a jitted per-batch `train_step`. Both run the same model,
optimizer and batch size on real MNIST; compilation is excluded from both (one warm-up epoch).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import jax
import numpy as np
import optax

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

from hoyertrim import masks  # noqa: E402
from hoyertrim.data import load_dataset  # noqa: E402
from hoyertrim.models import create_model  # noqa: E402
from hoyertrim.train import create_train_state, make_train_epoch, make_train_step  # noqa: E402


def naive_epoch(step, state, images, labels, batch_size, rng):
    order = rng.permutation(len(labels))
    for start in range(0, len(labels) - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        state, _ = step(state, images[idx], labels[idx])
    return state


def matmul_rate(size: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of a size³ float32 matmul on the default device (best of ``repeats``)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jax.numpy.float32)
    product = jax.jit(lambda a: a @ a)
    jax.block_until_ready(product(a))
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(product(a))
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best


def measure(model_name, dataset, batch_size, epochs, peak):
    model = create_model(model_name)
    tx = optax.adam(1e-3)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), dataset.image_shape)
    images, labels = dataset.train.images, dataset.train.labels
    num_images = (len(labels) // batch_size) * batch_size

    scan_epoch = make_train_epoch(model, tx, batch_size)
    device_images, device_labels = jax.device_put(images), jax.device_put(labels)
    scanned = jax.block_until_ready(scan_epoch(state, device_images, device_labels)[0])  # warm-up
    started = time.perf_counter()
    for _ in range(epochs):
        scanned, _ = scan_epoch(scanned, device_images, device_labels)
    jax.block_until_ready(scanned)
    scan_rate = epochs * num_images / (time.perf_counter() - started)

    step = jax.jit(make_train_step(model, tx))
    rng = np.random.default_rng(0)
    naive = jax.block_until_ready(naive_epoch(step, state, images, labels, batch_size, rng))
    started = time.perf_counter()
    for _ in range(epochs):
        naive = naive_epoch(step, naive, images, labels, batch_size, rng)
    jax.block_until_ready(naive)
    naive_rate = epochs * num_images / (time.perf_counter() - started)
    forward = masks.sparsity_report(state.params, model, dataset.image_shape).flops("dense")
    achieved = 3 * forward * scan_rate
    return {"model": model_name, "batch_size": batch_size, "scan_images_per_s": scan_rate,
            "naive_images_per_s": naive_rate, "speedup": scan_rate / naive_rate,
            "scan_epoch_seconds": len(labels) / scan_rate, "forward_flops_per_image": forward,
            "training_gflop_per_s": achieved / 1e9, "matmul_gflop_per_s": peak / 1e9,
            "matmul_rate_fraction": achieved / peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    dataset = load_dataset("mnist", args.data_dir)
    peak = matmul_rate()
    print(f"backend={jax.default_backend()} devices={jax.device_count()} "
          f"batch={args.batch_size} epochs={args.epochs}; 1024³ float32 matmul: "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':<12} {'scan img/s':>12} {'naive img/s':>12} {'ratio':>7} {'epoch s':>8} "
          f"{'MFLOP/img fwd':>13} {'GFLOP/s':>8} {'of matmul':>9}")
    rows = []
    for name in ("lenet300100", "lenet5"):
        row = measure(name, dataset, args.batch_size, args.epochs, peak)
        rows.append(row)
        print(f"{name:<12} {row['scan_images_per_s']:>12,.0f} {row['naive_images_per_s']:>12,.0f} "
              f"{row['speedup']:>6.2f}x {row['scan_epoch_seconds']:>8.2f} "
              f"{row['forward_flops_per_image'] / 1e6:>13.2f} "
              f"{row['training_gflop_per_s']:>8.1f} {100 * row['matmul_rate_fraction']:>8.0f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
