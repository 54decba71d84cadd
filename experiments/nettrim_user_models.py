"""Net-Trim on models written the ordinary Flax way (examples/user_models.py), trained on MNIST.

    python experiments/nettrim_user_models.py --model flax_cnn --epsilon 0.1 \
        --scheme parallel cascade

Trains the model (Adam, cosine schedule, best epoch on the validation split; reused when its
checkpoint exists), then prunes it with `nettrim.prune_network` from ``--samples`` training
images, held-out = the first 1,000 validation images, and evaluates the test set once per
pruned network. Writes results/nettrim_user_<model>.json: per layer the program used and why,
the certified ε, the forward-measured discrepancy on the calibration rows and on the held-out
images, kept fractions; held-out top-1 agreement and logits error; test accuracy before/after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
import time

import common

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from examples import user_models  # noqa: E402
from hoyertrim import nettrim  # noqa: E402
from hoyertrim.data import load_dataset  # noqa: E402
from hoyertrim.train import cross_entropy  # noqa: E402

MODELS = {
    "flax_cnn": (user_models.FlaxExampleCNN, {}, {}),
    "conv_bn": (user_models.ConvBatchNormCNN, {"train": False}, {"train": True}),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="flax_cnn")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epsilon", type=float, nargs="+", default=[0.1])
    parser.add_argument("--scheme", nargs="+", choices=["parallel", "cascade"],
                        default=["parallel", "cascade"])
    parser.add_argument("--samples", type=int, default=5000,
                        help="training images whose layer signals define the problems")
    parser.add_argument("--results", default=None,
                        help="results JSON (default results/nettrim_user_<model>.json)")
    common.add_common_args(parser)
    return parser.parse_args(argv)


def accuracy(model, variables, images, labels, apply_kwargs, batch_size=1000) -> float:
    predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, **apply_kwargs), -1))
    correct = sum(int(np.sum(np.asarray(predict(variables, images[i:i + batch_size]))
                             == labels[i:i + batch_size]))
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def train(model, dataset, args, eval_kwargs, train_kwargs):
    """Adam + cosine; a Python loop of jitted steps (XLA's conv gradients are slow inside scan on
    CPU). Returns the variables of the best validation epoch and the training log."""
    key = jax.random.PRNGKey(args.seed)
    variables = model.init({"params": key, "dropout": key}, dataset.train.images[:1],
                           **eval_kwargs)
    steps_per_epoch = len(dataset.train) // args.batch_size
    tx = optax.adam(optax.cosine_decay_schedule(args.learning_rate,
                                                args.epochs * steps_per_epoch))
    opt_state = tx.init(variables["params"])
    mutable = [k for k in variables if k != "params"]

    @jax.jit
    def step(variables, opt_state, images, labels, key):
        def loss_fn(params):
            out = model.apply({**variables, "params": params}, images, rngs={"dropout": key},
                              **({"mutable": mutable} if mutable else {}), **train_kwargs)
            logits, state = out if mutable else (out, {})
            return cross_entropy(logits, labels), state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state)
        params = optax.apply_updates(variables["params"], updates)
        return {**variables, **state, "params": params}, opt_state, loss

    best, best_val, log = variables, -1.0, []
    for epoch in range(args.epochs):
        started = time.perf_counter()
        order = np.random.default_rng(args.seed + epoch).permutation(len(dataset.train))
        for i in range(steps_per_epoch):
            batch = order[i * args.batch_size:(i + 1) * args.batch_size]
            variables, opt_state, loss = step(variables, opt_state, dataset.train.images[batch],
                                              dataset.train.labels[batch],
                                              jax.random.fold_in(key, epoch * 100003 + i))
        val = accuracy(model, variables, dataset.validation.images, dataset.validation.labels,
                       eval_kwargs)
        log.append({"epoch": epoch + 1, "val_accuracy": val, "loss": float(loss),
                    "seconds": time.perf_counter() - started})
        print(json.dumps(log[-1]), flush=True)
        if val > best_val:
            best, best_val = variables, val
    return best, log


def markdown(result: dict) -> str:
    """The README table of one model: per point, then per layer."""
    rows = [f"Dense test accuracy {100 * result['dense_test_accuracy']:.2f}%; "
            f"{result['calibration_samples']:,} calibration images, "
            f"{result['heldout_samples']:,} held-out.", "",
            "| scheme | ε | kept % | test % (dense → pruned) | held-out top-1 agreement | "
            "held-out logits rel. error | per layer: program, kept %, certified ε / measured "
            "(calibration) / measured (held-out) |", "|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        layers = "<br>".join(
            f"{name}: {l['program']}, {100 * l['kept_fraction']:.1f}%, {l['epsilon']:.4f} / "
            f"{l['measured']:.4f} / {l['heldout_measured']:.4f}"
            + (" (trained weights kept)" if l["fallback"] else "")
            for name, l in p["layers"].items())
        rows.append(f"| {p['scheme']} | {p['epsilon']:g} | {100 * p['kept_fraction']:.2f} | "
                    f"{100 * result['dense_test_accuracy']:.2f} → {100 * p['test_accuracy']:.2f}"
                    f" | {100 * p['heldout']['top1_agreement']:.1f}% | "
                    f"{p['heldout']['logits_relative_error']:.3f} | {layers} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    build, eval_kwargs, train_kwargs = MODELS[args.model]
    model = build()
    dataset = load_dataset("mnist", args.data_dir)
    config = {k: getattr(args, k) for k in ("model", "epochs", "learning_rate", "batch_size",
                                            "seed")}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    out = common.workdir(args, f"user_{args.model}_{key}")
    trained_dir = out / "trained"
    template = model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
                          dataset.train.images[:1], **eval_kwargs)
    if (trained_dir / "log.json").exists():
        with ocp.StandardCheckpointer() as checkpointer:
            variables = checkpointer.restore(trained_dir / "variables", template)
        log = json.loads((trained_dir / "log.json").read_text())
        print(f"reusing the trained model in {trained_dir}")
    else:
        variables, log = train(model, dataset, args, eval_kwargs, train_kwargs)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(trained_dir / "variables", variables, force=True)
        (trained_dir / "log.json").write_text(json.dumps(log))
    test = dataset.test
    dense_test = accuracy(model, variables, test.images, test.labels, eval_kwargs)
    print(f"dense test accuracy {dense_test:.4f}")
    calibration = dataset.train.images[:args.samples]
    heldout = dataset.validation.images[:1000]
    points = []
    for scheme in args.scheme:
        for epsilon in args.epsilon:
            started = time.perf_counter()
            pruned = nettrim.prune_network(model, variables, calibration, epsilon=epsilon,
                                           scheme=scheme, apply_kwargs=eval_kwargs,
                                           heldout=heldout, key=jax.random.PRNGKey(args.seed),
                                           progress=not args.no_progress)
            seconds = time.perf_counter() - started
            saved = out / "pruned" / f"{scheme}_eps{epsilon:g}"
            nettrim.save_pruned(saved, pruned)  # hoyertrim.load(saved) gives this point
            pruned_vars = pruned.variables or {"params": pruned.params}
            report = pruned.report(model, dataset.image_shape, eval_kwargs)
            point = {"scheme": scheme, "epsilon": epsilon, "seconds": seconds,
                     "kept_fraction": report.kept_fraction, "heldout": pruned.heldout,
                     "test_accuracy": accuracy(model, pruned_vars, test.images, test.labels,
                                               eval_kwargs),
                     "layers": pruned.layers, "report": report.as_dict(),
                     "checkpoint": str(saved)}
            points.append(point)
            print(json.dumps({k: point[k] for k in ("scheme", "epsilon", "kept_fraction",
                                                     "test_accuracy", "heldout", "seconds")}),
                  flush=True)
    result = {"experiment": "nettrim_user_models", "config": {**vars(args)},
              "workdir": str(out), "training": log, "dense_test_accuracy": dense_test,
              "calibration_samples": args.samples, "heldout_samples": len(heldout),
              "points": points, "environment": common.environment()}
    path = pathlib.Path(args.results or f"results/nettrim_user_{args.model}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    common.write_json(path, result)
    path.with_suffix(".md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main()
