"""Cost of DeepHoyer regularization: HS- and Group-HS-regularized training vs plain, same process.

    python benchmarks/penalty_overhead.py [--data-dir ../shared/data] [--epochs 3]

Each configuration trains whole scanned epochs (`make_train_epoch`) on real MNIST with Adam; the
ratio is regularized time / plain time for the same model (1.00 = free), each the fastest of
``--epochs`` timed epochs.
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import optax

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

from hoyertrim.data import load_dataset  # noqa: E402
from hoyertrim.models import create_model  # noqa: E402
from hoyertrim.train import create_train_state, make_train_epoch  # noqa: E402
from hoyertrim.transforms import (group_hoyer_square_regularization,  # noqa: E402
                                  hoyer_square_regularization)


def epoch_seconds(model, tx, images, labels, epochs, batch_size):
    """The fastest of ``epochs`` timed epochs (after a compile + warm-up one): on a shared CPU
    the minimum is the stable statistic; the mean picks up whatever else ran meanwhile."""
    state = create_train_state(model, tx, jax.random.PRNGKey(0), images.shape[1:])
    train_epoch = make_train_epoch(model, tx, batch_size)
    state = jax.block_until_ready(train_epoch(state, images, labels)[0])  # compile + warm-up
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        state = jax.block_until_ready(train_epoch(state, images, labels)[0])
        times.append(time.perf_counter() - started)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    dataset = load_dataset("mnist", args.data_dir)
    images, labels = jax.device_put(dataset.train.images), jax.device_put(dataset.train.labels)
    configs = {
        "plain": lambda: optax.adam(1e-3),
        "HS": lambda: optax.chain(hoyer_square_regularization(1e-4), optax.adam(1e-3)),
        "Group-HS": lambda: optax.chain(group_hoyer_square_regularization(1e-4),
                                        optax.adam(1e-3)),
    }
    print(f"backend={jax.default_backend()} batch={args.batch_size} epochs={args.epochs}")
    print(f"{'model':<12} {'plain s/epoch':>14} {'HS ratio':>9} {'Group-HS ratio':>15}")
    for name in ("lenet300100", "lenet5"):
        model = create_model(name)
        seconds = {k: epoch_seconds(model, make(), images, labels, args.epochs, args.batch_size)
                   for k, make in configs.items()}
        print(f"{name:<12} {seconds['plain']:>14.3f} {seconds['HS'] / seconds['plain']:>8.3f}x "
              f"{seconds['Group-HS'] / seconds['plain']:>14.3f}x")


if __name__ == "__main__":
    main()
