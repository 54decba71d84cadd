"""DeepHoyer's regularizer comparison (its RQ1–3): which sparsity penalty gives the best
error-vs-compression and error-vs-FLOPs trade-off under one prune and fine-tune recipe.

    python experiments/deephoyer_regularizers.py --recipe lenet300100
    python experiments/deephoyer_regularizers.py --recipe lenet5
    python experiments/deephoyer_regularizers.py --recipe lenet300100_long

For each regularizer — Hoyer-Square, Hoyer, L1, transformed L1 (element-wise), group lasso and
Group-HS (whole units) — and each strength α of its sweep (`RECIPES`): regularized training from
the dense model of `experiments/run.py` (Adam 1e-3, cosine, the last epoch kept), then for each
threshold s the same prune (|w| < s·std(w) per tensor, DeepHoyer's rule; a unit whose weights all
fall under it disappears) and the same masked fine-tune (cross-entropy, Adam 3e-4, cosine, the
best *validation* epoch kept). Each point's test error is evaluated once, after that selection.
The strengths span each penalty's own useful range (their scales differ by orders of magnitude:
Hoyer's gradient is HS's divided by 2·H ≈ √n), so every curve runs from little pruning to
visible accuracy loss.

Every stage is a `hoyertrim.pipeline` directory under ``--root`` keyed by its settings, so a
rerun reuses finished stages and resumes an interrupted one. Writes
``results/deephoyer_regularizers_<recipe>.json`` (every point), ``.md`` (the per-regularizer
frontier, selected on validation) and ``.png`` (test error vs compression and vs forward FLOPs).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time


import common
from hoyertrim import pipeline
from run import DENSE_LENET5, DENSE_LENET300100

FINETUNE_LEARNING_RATE = 3e-4  # masked fine-tune, Adam with a cosine schedule
ELEMENTWISE = ("hoyer_square", "hoyer", "l1", "transformed_l1")
GROUPED = ("group_hoyer_square", "group_lasso")
LABELS = {"hoyer_square": "Hoyer-Square", "hoyer": "Hoyer", "l1": "L1",
          "transformed_l1": "transformed L1", "group_hoyer_square": "Group-HS",
          "group_lasso": "group lasso"}

RECIPES = {
    "lenet300100": {
        "dense": DENSE_LENET300100[1], "reg_epochs": 20, "finetune_epochs": 5,
        "thresholds": (0.05, 0.1, 0.2),
        "strengths": {"hoyer_square": (1e-5, 3e-5, 1e-4, 3e-4),
                      "hoyer": (3e-3, 1e-2, 3e-2, 1e-1),
                      "l1": (3e-5, 1e-4, 3e-4, 1e-3),
                      "transformed_l1": (3e-5, 1e-4, 3e-4, 1e-3),
                      "group_hoyer_square": (3e-4, 1e-3, 3e-3, 1e-2),
                      "group_lasso": (3e-4, 1e-3, 3e-3, 1e-2)}},
    # The budget check: the paper trains the regularized model much longer. The three element-wise
    # penalties that lead the 20-epoch curves, at the strengths of their high-compression end,
    # with 100 regularized epochs.
    "lenet300100_long": {
        "dense": DENSE_LENET300100[1], "reg_epochs": 100, "finetune_epochs": 5,
        "thresholds": (0.1,),
        "strengths": {"hoyer_square": (1e-4, 3e-4), "l1": (1e-4, 3e-4),
                      "transformed_l1": (1e-4, 3e-4)}},
    "lenet5": {
        "dense": DENSE_LENET5[1], "reg_epochs": 8, "finetune_epochs": 4, "thresholds": (0.1,),
        "strengths": {"hoyer_square": (3e-5, 1e-4, 3e-4),
                      "hoyer": (1e-2, 3e-2, 1e-1),
                      "l1": (3e-5, 1e-4, 3e-4),
                      "transformed_l1": (3e-5, 1e-4, 3e-4),
                      "group_hoyer_square": (1e-3, 3e-3, 1e-2),
                      "group_lasso": (3e-4, 1e-3, 3e-3)}},
}


def point_of(directory, penalty, strength, threshold, data_dir) -> dict:
    """One curve point: validation and test error and the sparsity of a fine-tuned stage."""
    validation = pipeline.evaluate(directory, split="validation", data_dir=data_dir)
    test = pipeline.evaluate(directory, split="test", data_dir=data_dir)
    sparsity = test["sparsity"]
    return {"penalty": penalty, "strength": strength, "threshold": threshold,
            "val_error": 100 * (1 - validation["accuracy"]),
            "test_error": 100 * (1 - test["accuracy"]),
            "compression": sparsity["compression"], "kept_fraction": sparsity["kept_fraction"],
            "architecture": sparsity["architecture"],
            "flops_reduction_sparse": sparsity["dense_flops"] / sparsity["sparse_flops"],
            "flops_reduction_structured": sparsity["dense_flops"] / sparsity["structured_flops"],
            "directory": str(directory)}


def frontier(points, dense_val_error, tolerance) -> list[dict]:
    """Per penalty, the most compressed point whose *validation* error is within ``tolerance``
    points of the dense model's (None where no point qualifies)."""
    rows = []
    for penalty in dict.fromkeys(p["penalty"] for p in points):
        ok = [p for p in points if p["penalty"] == penalty
              and p["val_error"] <= dense_val_error + tolerance]
        rows.append({"penalty": penalty, "tolerance": tolerance,
                     "point": max(ok, key=lambda p: p["compression"]) if ok else None})
    return rows


def markdown(model, dense, points, tolerances) -> str:
    lines = [f"# DeepHoyer regularizers on {model}", "",
             f"Dense: validation error {dense['val_error']:.2f}%, test error "
             f"{dense['test_error']:.2f}%.", ""]
    for tolerance in tolerances:
        lines += [f"Most compressed point with validation error ≤ dense + {tolerance:g} points:",
                  "", "| regularizer | α | s | compression | FLOPs reduction (structured) | "
                  "units kept | val error | test error |", "|---|---|---|---|---|---|---|---|"]
        for row in frontier(points, dense["val_error"], tolerance):
            p = row["point"]
            lines.append(f"| {LABELS[row['penalty']]} | — | — | none qualifies | | | | |"
                         if p is None else
                         f"| {LABELS[row['penalty']]} | {p['strength']:g} | {p['threshold']:g} | "
                         f"{p['compression']:.1f}x | {p['flops_reduction_structured']:.1f}x | "
                         f"{p['architecture']} | {p['val_error']:.2f}% | {p['test_error']:.2f}% |")
        lines.append("")
    return "\n".join(lines)


def plot(path, model, dense, points) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, key, xlabel in ((axes[0], "compression", "compression (weights / kept)"),
                              (axes[1], "flops_reduction_structured",
                               "forward FLOPs reduction (dense kernels of the kept units)")):
        for penalty in LABELS:
            mine = sorted((p for p in points if p["penalty"] == penalty), key=lambda p: p[key])
            if mine:
                axis.plot([p[key] for p in mine], [p["test_error"] for p in mine],
                          "o-" if penalty in ELEMENTWISE else "s--", ms=4, label=LABELS[penalty])
        axis.axhline(dense["test_error"], color="gray", lw=0.8, ls=":", label="dense")
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test error (%)")
    axes[0].legend(fontsize=8)
    errors = [p["test_error"] for p in points]
    axes[0].set_ylim(min(errors + [dense["test_error"]]) - 0.1,
                     min(max(errors), dense["test_error"] + 4))
    fig.suptitle(f"{model}: regularizer → prune |w| < s·std → masked fine-tune")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="lenet300100",
                        help="the model, its dense recipe and the sweep (`RECIPES`)")
    parser.add_argument("--penalties", nargs="+", choices=list(LABELS), default=None,
                        help="default: the recipe's")
    parser.add_argument("--strengths", type=float, nargs="+", default=None,
                        help="override every penalty's strength sweep (for quick runs)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=None,
                        help="prune thresholds s (default: the model's recipe)")
    parser.add_argument("--reg-epochs", type=int, default=None)
    parser.add_argument("--finetune-epochs", type=int, default=None)
    parser.add_argument("--dense-epochs", type=int, default=None,
                        help="override the dense recipe's epochs (for quick runs; another "
                             "directory)")
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.1, 0.3, 0.5],
                        help="frontier table: validation error within these points of dense")
    parser.add_argument("--root", default="runs/pipeline", help="where stage directories go")
    parser.add_argument("--results", default=None,
                        help="results JSON (default results/deephoyer_regularizers_<recipe>.json)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    recipe = RECIPES[args.recipe]
    model = recipe["dense"]["model"]
    reg_epochs = args.reg_epochs or recipe["reg_epochs"]
    finetune_epochs = args.finetune_epochs or recipe["finetune_epochs"]
    thresholds = args.thresholds or recipe["thresholds"]
    results = pathlib.Path(args.results or f"results/deephoyer_regularizers_{args.recipe}.json")
    progress = not args.no_progress
    started = time.perf_counter()

    dense_settings = dict(recipe["dense"])
    if args.dense_epochs:
        dense_settings["epochs"] = args.dense_epochs
    dense_dir = common.dense_stage(dense_settings, root=args.root, data_dir=args.data_dir,
                                   progress=progress)
    dense_val = pipeline.evaluate(dense_dir, split="validation", data_dir=args.data_dir)
    dense_test = pipeline.evaluate(dense_dir, split="test", data_dir=args.data_dir)
    dense = {"val_error": 100 * (1 - dense_val["accuracy"]),
             "test_error": 100 * (1 - dense_test["accuracy"]), "directory": str(dense_dir)}

    def directory(stage, parent, settings):
        return common.stage_directory(args.root, stage, model, parent, settings)

    points = []
    for penalty in args.penalties or recipe["strengths"]:
        for strength in args.strengths or recipe["strengths"][penalty]:
            settings = {"penalty": penalty, "strength": strength, "epochs": reg_epochs}
            reg = pipeline.regularize(
                dense_dir, directory("regularize", dense_dir, settings),
                data_dir=args.data_dir, progress=progress,
                **pipeline.training_kwargs("regularize", settings)).directory
            for threshold in thresholds:
                prune_settings = {"rule": "std", "value": threshold}
                pruned = pipeline.prune(
                    reg, directory("prune", reg, prune_settings),
                    data_dir=args.data_dir, **prune_settings).directory
                ft_settings = {"epochs": finetune_epochs, "learning_rate": FINETUNE_LEARNING_RATE}
                tuned = pipeline.finetune(
                    pruned, directory("finetune", pruned, ft_settings),
                    data_dir=args.data_dir, progress=progress,
                    **pipeline.training_kwargs("finetune", ft_settings)).directory
                point = point_of(tuned, penalty, strength, threshold, args.data_dir)
                points.append(point)
                print(f"{LABELS[penalty]} α={strength:g} s={threshold:g}: test error "
                      f"{point['test_error']:.2f}% (val {point['val_error']:.2f}%) at "
                      f"{point['compression']:.1f}x, FLOPs /"
                      f"{point['flops_reduction_structured']:.1f} structured "
                      f"({point['architecture']})", flush=True)

    payload = {"model": model, "recipe": args.recipe,
               "command": f"python experiments/deephoyer_regularizers.py --recipe {args.recipe}",
               "settings": {"dense": dense_settings, "reg_epochs": reg_epochs,
                          "finetune_epochs": finetune_epochs, "thresholds": list(thresholds),
                          "prune_rule": "std", "finetune_learning_rate": FINETUNE_LEARNING_RATE},
               "dense": dense, "points": points,
               "frontier": {f"{t:g}": frontier(points, dense["val_error"], t)
                            for t in args.tolerances},
               "seconds_this_run": time.perf_counter() - started,
               "environment": common.environment()}
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(payload, indent=1) + "\n")
    title = f"{model}, {reg_epochs} regularized epochs"
    results.with_suffix(".md").write_text(markdown(title, dense, points, args.tolerances))
    plot(results.with_suffix(".png"), title, dense, points)
    print(f"wrote {results} (.md, .png) in {time.perf_counter() - started:.0f} s")
    return payload


if __name__ == "__main__":
    main()
