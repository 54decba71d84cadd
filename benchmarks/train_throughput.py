"""Training throughput (images/s): `make_train_epoch` as used (its ``loop="auto"``), the epoch
forced into one `lax.scan`, and a naive per-batch loop, same process.

    python benchmarks/train_throughput.py [--data-dir ../shared/data] [--epochs 2]

LeNet-300-100 and LeNet-5 train on MNIST, ResNet-20 on Fashion-MNIST (28x28x1) — on a part of
the training set (``--resnet-images``, and a quarter of it for the scanned epoch, whose steps
take seconds each on XLA:CPU); "epoch s" is the full training set's time at the measured rate.

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


def epoch_rate(train_epoch, state, images, labels, batch_size, epochs) -> float:
    """Images/s of ``epochs`` epochs after a warm-up epoch (compilation excluded)."""
    images, labels = jax.device_put(images), jax.device_put(labels)
    state = jax.block_until_ready(train_epoch(state, images, labels)[0])
    started = time.perf_counter()
    for _ in range(epochs):
        state, _ = train_epoch(state, images, labels)
    jax.block_until_ready(state)
    return epochs * (len(labels) // batch_size) * batch_size / (time.perf_counter() - started)


def measure(model_name, dataset, batch_size, epochs, peak, num_images=None):
    kwargs = {"input_shape": dataset.image_shape} if model_name.startswith("resnet") else {}
    model = create_model(model_name, **kwargs)
    tx = optax.adam(1e-3)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), dataset.image_shape)
    forward = masks.sparsity_report(state.params, model, dataset.image_shape,
                                    model_state=state.model_state).flops("dense")
    images, labels = dataset.train.images[:num_images], dataset.train.labels[:num_images]
    rate = epoch_rate(make_train_epoch(model, tx, batch_size), state, images, labels,
                      batch_size, epochs)
    # The scanned epoch on a quarter of the images when they are limited (its steps are slow).
    part = len(labels) if num_images is None else max(batch_size, len(labels) // 4)
    scan_rate = epoch_rate(make_train_epoch(model, tx, batch_size, loop="scan"), state,
                           images[:part], labels[:part], batch_size, 1 if num_images else epochs)

    step = jax.jit(make_train_step(model, tx))
    rng = np.random.default_rng(0)
    naive = jax.block_until_ready(naive_epoch(step, state, images, labels, batch_size, rng))
    started = time.perf_counter()
    for _ in range(epochs):
        naive = naive_epoch(step, naive, images, labels, batch_size, rng)
    jax.block_until_ready(naive)
    naive_rate = epochs * (len(labels) // batch_size) * batch_size / (
        time.perf_counter() - started)
    achieved = 3 * forward * rate
    return {"model": model_name, "dataset": dataset.name, "batch_size": batch_size,
            "images_per_s": rate, "scan_images_per_s": scan_rate,
            "naive_images_per_s": naive_rate, "speedup_over_naive": rate / naive_rate,
            "epoch_seconds": len(dataset.train.labels) / rate,
            "forward_flops_per_image": forward, "training_gflop_per_s": achieved / 1e9,
            "matmul_gflop_per_s": peak / 1e9, "matmul_rate_fraction": achieved / peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--resnet-images", type=int, default=2048,
                        help="training images of ResNet-20's measured epochs")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    mnist = load_dataset("mnist", args.data_dir)
    fashion = load_dataset("fashion_mnist", args.data_dir)
    peak = matmul_rate()
    print(f"backend={jax.default_backend()} devices={jax.device_count()} "
          f"batch={args.batch_size} epochs={args.epochs}; 1024³ float32 matmul: "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':<12} {'img/s':>8} {'scan img/s':>11} {'naive img/s':>12} {'vs naive':>8} "
          f"{'epoch s':>8} {'MFLOP/img fwd':>13} {'GFLOP/s':>8} {'of matmul':>9}")
    rows = []
    for name, dataset, num_images in (("lenet300100", mnist, None), ("lenet5", mnist, None),
                                      ("resnet20", fashion, args.resnet_images)):
        row = measure(name, dataset, args.batch_size, args.epochs, peak, num_images)
        rows.append(row)
        print(f"{name:<12} {row['images_per_s']:>8,.0f} {row['scan_images_per_s']:>11,.0f} "
              f"{row['naive_images_per_s']:>12,.0f} "
              f"{row['speedup_over_naive']:>7.2f}x {row['epoch_seconds']:>8.2f} "
              f"{row['forward_flops_per_image'] / 1e6:>13.2f} "
              f"{row['training_gflop_per_s']:>8.1f} {100 * row['matmul_rate_fraction']:>8.0f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
