"""Net-Trim against the one-shot layer-wise peers (SparseGPT, Wanda, magnitude) on MNIST:
same dense model, same calibration images, the same per-layer kept fraction, no fine-tune;
then the same short masked fine-tune on each.

    python experiments/peers_mnist.py --model lenet300100
    python experiments/peers_mnist.py --model lenet5 --sparsity 0.8 0.9 0.95 --nm

Per point: test accuracy (once), per-layer measured discrepancy (post-ReLU for hidden layers,
pre-activation for the output layer) on the calibration and on held-out validation images, the
logits' held-out agreement, and the wall time of the pruning call. Net-Trim runs in its parallel
and cascade schemes; the peers run sequentially (each layer sees the pruned layers before it),
as their papers do. N:M (2:4) prunes the layers whose input count is a multiple of 4; others stay
dense (named in the output). Writes results/peers_<model>.json, .md and .png; every point names
its pruned and fine-tuned checkpoint directories.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

import common
from run import DENSE_LENET300100, DENSE_LENET5
from hoyertrim import nettrim, pipeline
from hoyertrim.nettrim import peers
from hoyertrim.train import predict_accuracy

METHODS = {  # label: (solver, scheme, solver options)
    "Net-Trim parallel": (nettrim.solve_layer, "parallel", {}),
    "Net-Trim cascade": (nettrim.solve_layer, "cascade", {}),
    # A loose λ search cut to the exact count and re-fit (solve_layer's polish); not for 2:4,
    # whose Net-Trim mode always re-fits.
    "Net-Trim parallel + polish": (nettrim.solve_layer, "parallel", {"polish": 1}),
    "Net-Trim cascade + polish": (nettrim.solve_layer, "cascade", {"polish": 1}),
    "SparseGPT": (peers.sparsegpt_layer, "cascade", {}),
    "Wanda": (peers.wanda_layer, "cascade", {}),
    "magnitude": (peers.magnitude_layer, "parallel", {}),
}
DENSE = {"lenet300100": DENSE_LENET300100[1], "lenet5": DENSE_LENET5[1]}  # run.py's recipes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=sorted(DENSE), default="lenet300100")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95],
                        help="per-layer sparsity (1 − kept fraction) of every pruned layer")
    parser.add_argument("--nm", action="store_true", help="also the 2:4 pattern")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS),
                        default=[m for m in METHODS if not m.endswith("polish")],
                        help="which methods (the polish variants only when named)")
    parser.add_argument("--samples", type=int, default=5000, help="calibration training images")
    parser.add_argument("--finetune-epochs", type=int, default=3,
                        help="masked fine-tune after pruning (0: none)")
    parser.add_argument("--finetune-learning-rate", type=float, default=1e-3,
                        help="Adam, cosine decay")
    parser.add_argument("--dense", default=None,
                        help="dense stage directory (default: experiments/run.py's dense model "
                             "of --model, trained if absent)")
    parser.add_argument("--results", default=None,
                        help="results file (default: results/peers_<model>.json)")
    common.add_common_args(parser)
    return parser.parse_args(argv)


def dense_stage(args) -> pathlib.Path:
    if args.dense:
        return pathlib.Path(args.dense)
    return common.dense_stage(DENSE[args.model], data_dir=args.data_dir,
                              progress=not args.no_progress)


def nm_layers(params, m=4):
    """Layers whose kernel input count (rows of the flattened kernel) is a multiple of m."""
    chosen = []
    for name, layer in params.items():
        kernel = np.asarray(layer["kernel"])
        if int(np.prod(kernel.shape[:-1])) % m == 0:
            chosen.append(name)
    return chosen


def main(argv=None):
    args = parse_args(argv)
    out = common.workdir(args, f"peers_{args.model}")
    dense_dir = dense_stage(args)
    dense = pipeline.load(dense_dir)
    model, params = dense.model, dense.params
    dataset = pipeline.load_data(dense.manifest, args.data_dir)
    calibration = dataset.train.images[:args.samples]
    heldout = dataset.validation.images[:1000]

    def test_accuracy(p):
        return 100 * predict_accuracy(model, p, {}, dataset.test.images, dataset.test.labels)

    dense_test = test_accuracy(params)
    results_path = pathlib.Path(args.results or f"results/peers_{args.model}.json")
    points = json.loads(results_path.read_text())["points"] if results_path.exists() else []
    done = {(p["method"], p["target"]) for p in points}
    targets = [f"{s:g}" for s in args.sparsity] + (["2:4"] if args.nm else [])
    for target in targets:
        for method in args.methods:
            solver, scheme, solver_options = METHODS[method]
            if (method, target) in done or (target == "2:4" and solver_options):
                continue
            options, layers = dict(solver_options), None
            if target == "2:4":
                layers = nm_layers(params)
                options = {"kept_fraction": 0.5, "nm": (2, 4)}
                if solver is nettrim.solve_layer:
                    solver = nettrim.solve_layer_nm
            else:
                options["kept_fraction"] = 1 - float(target)
            started = time.perf_counter()
            pruned = nettrim.prune_network(model, params, calibration, scheme=scheme,
                                           solver=solver, layers=layers, heldout=heldout,
                                           progress=not args.no_progress, **options)
            seconds = time.perf_counter() - started
            tag = f"{method.replace(' ', '_')}_{target.replace(':', 'of')}"
            nettrim.save_pruned(out / "pruned" / tag, pruned)
            report = pruned.report(model, dataset.image_shape)
            point = {"method": method, "scheme": scheme, "target": target, "seconds": seconds,
                     "kept_fraction": report.kept_fraction, "pruned_layers": list(pruned.layers),
                     "test_accuracy": test_accuracy(pruned.params), "heldout": pruned.heldout,
                     "layers": {name: {k: layer.get(k) for k in (
                         "program", "kept_fraction", "measured", "heldout_measured",
                         "epsilon", "seconds")} for name, layer in pruned.layers.items()},
                     "checkpoint": str(out / "pruned" / tag)}
            if args.finetune_epochs:
                tuned = common.masked_finetune(
                    model, dataset, pruned.params, pruned.masks, out / "ft" / tag,
                    epochs=args.finetune_epochs, learning_rate=args.finetune_learning_rate,
                    batch_size=128, seed=args.seed, progress=False)
                point["finetuned_test_accuracy"] = test_accuracy(tuned)
                point["finetuned_checkpoint"] = str(out / "ft" / tag)
            points.append(point)
            print(f"{method} {target}: kept {100 * point['kept_fraction']:.2f}%, test "
                  f"{point['test_accuracy']:.2f}%" + (
                      f" → {point['finetuned_test_accuracy']:.2f}% fine-tuned"
                      if args.finetune_epochs else "") + f", {seconds:.1f} s", flush=True)
            payload = {"model": args.model, "dense": str(dense_dir.absolute()),
                       "dense_test_accuracy": dense_test, "samples": args.samples,
                       "finetune": {"epochs": args.finetune_epochs,
                                    "learning_rate": args.finetune_learning_rate},
                       "points": points, "environment": common.environment()}
            results_path.parent.mkdir(parents=True, exist_ok=True)
            common.write_json(results_path, payload)
            results_path.with_suffix(".md").write_text(markdown(payload))
    plot(json.loads(results_path.read_text()), results_path.with_suffix(".png"))
    return points


def markdown(payload) -> str:
    order = {m: i for i, m in enumerate(METHODS)}
    rows = [f"{payload['model']}: dense test accuracy {payload['dense_test_accuracy']:.2f}%, "
            f"{payload['samples']:,} calibration images, no fine-tune then "
            f"{payload['finetune']['epochs']} masked epochs (Adam "
            f"{payload['finetune']['learning_rate']:g}, cosine).\n",
            "| sparsity | method | kept % | test % | + fine-tune | held-out agreement | "
            "measured discrepancy per layer (calibration / held-out) | seconds |",
            "|---|---|---|---|---|---|---|---|"]
    for p in sorted(payload["points"], key=lambda p: (p["target"] == "2:4", p["target"],
                                                      order.get(p["method"], 99))):
        layers = "<br>".join(f"{n}: {l['measured']:.3f} / {l['heldout_measured']:.3f}"
                             for n, l in p["layers"].items())
        held = p.get("heldout") or {}
        rows.append(f"| {p['target']} | {p['method']} | {100 * p['kept_fraction']:.2f} | "
                    f"{p['test_accuracy']:.2f} | "
                    f"{p.get('finetuned_test_accuracy', float('nan')):.2f} | "
                    f"{100 * held.get('top1_agreement', float('nan')):.1f}% | {layers} | "
                    f"{p['seconds']:.1f} |")
    return "\n".join(rows) + "\n"


def plot(payload, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    colors = {"Net-Trim parallel": "#1f77b4", "Net-Trim cascade": "#d62728", "SparseGPT": "#2ca02c",
              "Wanda": "#ff7f0e", "magnitude": "#7f7f7f"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, key, title in ((axes[0], "test_accuracy", "no fine-tune"),
                           (axes[1], "finetuned_test_accuracy", "after the same fine-tune")):
        values = []
        for method in METHODS:
            rows = sorted((p for p in payload["points"] if p["method"] == method
                           and p["target"] != "2:4" and key in p),
                          key=lambda p: p["kept_fraction"])
            if rows:
                base = method.removesuffix(" + polish")  # polish: the same colour, dashed
                ax.plot([100 * p["kept_fraction"] for p in rows], [p[key] for p in rows],
                        "o-" if base == method else "s--", color=colors[base], label=method,
                        ms=4)
                values += [p[key] for p in rows]
        ax.axhline(payload["dense_test_accuracy"], color="black", lw=0.8, ls="--",
                   label="dense")
        ax.set_xscale("log")
        ax.set_xticks([5, 10, 20, 30, 50])
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("weights kept (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{payload['model']}, {title}")
        if values:
            ax.set_ylim(max(min(values) - 2, 0), payload["dense_test_accuracy"] + 1)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
