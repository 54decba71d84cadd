"""Trains a dense (unpruned) model and writes checkpoints plus a results JSON.

    python experiments/train_dense.py --model lenet300100 --dataset mnist --epochs 30

The checkpoint with the best validation accuracy is evaluated once on the test set.
"""

from __future__ import annotations

import argparse
import time

import jax
import optax

import common
from hoyertrim.checkpoint import Checkpointer
from hoyertrim.data import DATASETS, load_dataset
from hoyertrim.models import MODELS, count_params, create_model
from hoyertrim.train import create_train_state, fit, make_optimizer, predict_accuracy
from hoyertrim.transforms import l1_regularization


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="lenet300100")
    parser.add_argument("--dataset", choices=DATASETS, default="mnist")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd", "momentum"])
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout rate on hidden activations (MLP models only)")
    parser.add_argument("--l1", type=float, default=0.0,
                        help="strength of an L1 penalty on the kernels (Net-Trim's training)")
    common.add_common_args(parser)
    return parser.parse_args(argv)


def make_tx(config: dict, steps_per_epoch: int):
    """The run's optax transformation, rebuilt from its config (also used to restore it)."""
    tx = make_optimizer(config["optimizer"], config["learning_rate"],
                        total_steps=config["epochs"] * steps_per_epoch,
                        schedule=config["schedule"], weight_decay=config["weight_decay"])
    if config.get("l1"):
        tx = optax.chain(l1_regularization(config["l1"]), tx)
    return tx


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = common.workdir(args, f"dense_{args.model}_{args.dataset}")
    dataset = load_dataset(args.dataset, args.data_dir)
    model_kwargs = {"dropout_rate": args.dropout} if args.dropout else {}
    model = create_model(args.model, **model_kwargs)
    config = dict(vars(args))
    tx = make_tx(config, len(dataset.train) // args.batch_size)
    started = time.perf_counter()
    checkpointer = Checkpointer(out / "checkpoints")
    state, _ = fit(model, tx, dataset, epochs=args.epochs, batch_size=args.batch_size,
                   seed=args.seed, checkpointer=checkpointer, config=config,
                   metrics_log=out / "metrics.jsonl", progress=not args.no_progress)
    wall_seconds = time.perf_counter() - started
    best = checkpointer.best_step()
    template = create_train_state(model, tx, jax.random.PRNGKey(args.seed), dataset.image_shape)
    best_state, _ = checkpointer.restore(template, best)
    checkpointer.close()
    results = {
        "model": args.model, "dataset": args.dataset, "parameters": count_params(state.params),
        "best_epoch": best,
        "val_accuracy": predict_accuracy(model, best_state.params, best_state.model_state,
                                         dataset.validation.images, dataset.validation.labels),
        "test_accuracy": predict_accuracy(model, best_state.params, best_state.model_state,
                                          dataset.test.images, dataset.test.labels),
        "final_epoch_test_accuracy": predict_accuracy(model, state.params, state.model_state,
                                                      dataset.test.images, dataset.test.labels),
        "wall_seconds": wall_seconds, "config": config, "environment": common.environment(),
    }
    common.write_json(out / "results.json", results)
    print(f"{args.model} on {args.dataset}: test accuracy {results['test_accuracy']:.4f} "
          f"(best validation epoch {best}), {results['parameters']:,} parameters, "
          f"{wall_seconds:.0f} s")
    return results


if __name__ == "__main__":
    main()
