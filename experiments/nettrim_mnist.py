"""Net-Trim on MNIST: a sweep of epsilon, parallel and cascade, against magnitude pruning.

    python experiments/nettrim_mnist.py --model lenet300100 --epsilon 0.02 0.05 0.1 0.2 \
        --scheme parallel cascade --finetune-epochs 3

For every (scheme, epsilon): Net-Trim on the dense model (signals from ``--samples`` training
images), test accuracy before and after a short masked fine-tune, and the paper's baseline —
magnitude pruning of every layer to exactly the same per-layer nonzero count, with and without the
same fine-tune. Results go to results.json / results.md and a plot of accuracy vs kept fraction.
Each pruned network is saved as an orbax checkpoint (params, masks, per-layer report).
"""

from __future__ import annotations

import argparse
import json
import time

import common
from hoyertrim import masks as masks_lib
from hoyertrim import nettrim
from hoyertrim.data import load_dataset
from hoyertrim.models import create_model
from hoyertrim.train import frozen_teacher, predict_accuracy


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["lenet300100", "nettrim_fc", "lenet5"],
                        default="lenet300100")
    parser.add_argument("--epsilon", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--scheme", nargs="+", choices=["parallel", "cascade"],
                        default=["parallel", "cascade"])
    parser.add_argument("--samples", type=int, default=5000,
                        help="training images whose layer signals define the problems")
    parser.add_argument("--maxiter", type=int, default=300, help="FISTA iterations per solve")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--finetune-learning-rate", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dense-workdir", default=None)
    common.add_distill_args(parser)
    common.add_common_args(parser)
    return parser.parse_args(argv)


def finetune(model, dataset, params, masks, args, directory, teacher):
    return common.masked_finetune(model, dataset, params, masks, directory,
                                  epochs=args.finetune_epochs,
                                  learning_rate=args.finetune_learning_rate,
                                  batch_size=args.batch_size, seed=args.seed, teacher=teacher,
                                  progress=False)


def accuracies(model, dataset, params):
    return {split: 100 * predict_accuracy(model, params, {}, getattr(dataset, split).images,
                                          getattr(dataset, split).labels)
            for split in ("validation", "test")}


def plot(points, dense_test, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"parallel": "o-", "cascade": "s-"}
    for scheme in sorted({p["scheme"] for p in points}):
        rows = sorted((p for p in points if p["scheme"] == scheme), key=lambda p: p["kept_fraction"])
        kept = [100 * p["kept_fraction"] for p in rows]
        ax.plot(kept, [p["nettrim"]["test"] for p in rows], styles[scheme],
                label=f"Net-Trim {scheme}")
        ax.plot(kept, [p["magnitude"]["test"] for p in rows], styles[scheme].replace("-", "--"),
                alpha=0.6, label=f"magnitude (same per-layer counts, {scheme})")
    ax.axhline(dense_test, color="gray", lw=0.8, label="dense")
    ax.set_xlabel("weights kept (%)")
    ax.set_ylabel("test accuracy (%), no fine-tune")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def markdown(points, dense):
    rows = [f"Dense test accuracy {dense['test']:.2f}%.\n",
            "| scheme | ε | kept % | kept % per layer | Net-Trim test % | + fine-tune | "
            "magnitude test % | + fine-tune | solve s per layer |",
            "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        per_layer = " / ".join(f"{100 * l['kept_fraction']:.1f}" for l in p["layers"].values())
        seconds = " / ".join(f"{l['seconds']:.1f}" for l in p["layers"].values())
        rows.append(f"| {p['scheme']} | {p['epsilon']:g} | {100 * p['kept_fraction']:.2f} | "
                    f"{per_layer} | {p['nettrim']['test']:.2f} | "
                    f"{p.get('nettrim_finetuned', {}).get('test', float('nan')):.2f} | "
                    f"{p['magnitude']['test']:.2f} | "
                    f"{p.get('magnitude_finetuned', {}).get('test', float('nan')):.2f} | "
                    f"{seconds} |")
    return "\n".join(rows) + "\n"


def main(argv=None):
    args = parse_args(argv)
    out = common.workdir(args, f"nettrim_{args.model}")
    dataset = load_dataset("mnist", args.data_dir)
    model = create_model(args.model)
    dense = common.restore_dense(args, model, dataset)
    dense_acc = accuracies(model, dataset, dense)
    images = dataset.train.images[: args.samples]
    teacher = frozen_teacher(model, dense) if args.distill else None
    results_path = out / "results.json"
    points = json.loads(results_path.read_text())["points"] if results_path.exists() else []
    if any(p.get("distill", False) != args.distill for p in points):
        raise SystemExit(f"{out} holds results fine-tuned {'without' if args.distill else 'with'} "
                         "--distill; pass another --workdir (its pruned/ checkpoints can be "
                         "copied there to skip the solves).")
    done = {(p["scheme"], p["epsilon"]) for p in points}
    for scheme in args.scheme:
        for epsilon in args.epsilon:
            if (scheme, epsilon) in done:
                continue
            tag = f"{scheme}_eps{epsilon:g}"
            if (out / "pruned" / tag).exists():  # solved by an earlier run of this workdir
                pruned = nettrim.load_pruned(out / "pruned" / tag, dense)
                solve_seconds = sum(layer["seconds"] for layer in pruned.layers.values())
            else:
                started = time.perf_counter()
                pruned = nettrim.prune_network(model, dense, images, epsilon=epsilon,
                                               scheme=scheme, maxiter=args.maxiter,
                                               heldout=dataset.validation.images[:1000],
                                               progress=not args.no_progress)
                solve_seconds = time.perf_counter() - started
                nettrim.save_pruned(out / "pruned" / tag, pruned)
            report = pruned.report()
            counts = {name: layer["kept_weights"] for name, layer in pruned.layers.items()}
            magnitude_params = masks_lib.apply_masks(dense, masks_lib.count_masks(dense, counts))
            point = {"scheme": scheme, "epsilon": epsilon, "kept_fraction": report.kept_fraction,
                     "distill": args.distill, "heldout": pruned.heldout,
                     "layers": pruned.layers, "solve_seconds": solve_seconds,
                     "nettrim": accuracies(model, dataset, pruned.params),
                     "magnitude": accuracies(model, dataset, magnitude_params),
                     # hoyertrim.load(...) of these gives each point's network.
                     "checkpoint": str(out / "pruned" / tag)}
            if args.finetune_epochs:
                point["nettrim_finetuned"] = accuracies(model, dataset, finetune(
                    model, dataset, pruned.params, pruned.masks, args, out / "ft" / tag,
                    teacher))
                point["finetuned_checkpoint"] = str(out / "ft" / tag)
                point["magnitude_finetuned_checkpoint"] = str(out / "ft" / f"magnitude_{tag}")
                magnitude_masks = masks_lib.nonzero_masks(magnitude_params)
                point["magnitude_finetuned"] = accuracies(model, dataset, finetune(
                    model, dataset, magnitude_params, magnitude_masks, args,
                    out / "ft" / f"magnitude_{tag}", teacher))
            points.append(point)
            print(f"{scheme} ε={epsilon:g}: kept {100 * point['kept_fraction']:.2f}%, test "
                  f"{point['nettrim']['test']:.2f}% (magnitude {point['magnitude']['test']:.2f}%)"
                  + (f", fine-tuned {point['nettrim_finetuned']['test']:.2f}% (magnitude "
                     f"{point['magnitude_finetuned']['test']:.2f}%)" if args.finetune_epochs
                     else "") + f", {solve_seconds:.0f} s")
            points.sort(key=lambda p: (p["scheme"], p["epsilon"]))
            common.write_json(results_path, {"model": args.model, "dense": dense_acc,
                                             "samples": args.samples, "points": points,
                                             "environment": common.environment()})
            (out / "results.md").write_text(markdown(points, dense_acc))
    plot(points, dense_acc["test"], out / "accuracy_vs_kept.png",
         f"Net-Trim vs magnitude, {args.model}, MNIST")
    return points


if __name__ == "__main__":
    main()
