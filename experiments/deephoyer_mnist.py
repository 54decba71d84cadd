"""DeepHoyer on MNIST: dense model -> regularized training -> prune -> masked fine-tune.

    python experiments/deephoyer_mnist.py --model lenet300100 --penalty hoyer_square \
        --strength 1e-4 3e-4 --threshold-scale 0.03 0.1 --baseline

Each (strength) gets one regularized run; each (strength, threshold) one pruned + fine-tuned run.
Fine-tuning keeps the epoch with the best *validation* accuracy; the test set is evaluated once per
point, after selection. With ``--baseline`` every point also gets magnitude pruning of the dense
model to exactly the same per-layer nonzero counts, fine-tuned the same way. Every stage writes
orbax checkpoints, so a rerun resumes (or skips) finished stages.
"""

from __future__ import annotations

import argparse
import json
import time

import optax

import common
from hoyertrim import masks as masks_lib
from hoyertrim.data import load_dataset
from hoyertrim.models import create_model
from hoyertrim.train import frozen_teacher, make_optimizer, predict_accuracy
from hoyertrim.transforms import REGULARIZERS, gradual_magnitude_pruning

PUBLISHED = {  # design.md: (test error %, compression) of element-wise methods on MNIST
    "lenet300100": {"Han 2015": (1.59, 12), "DNS": (1.99, 56), "Sparse VD": (1.92, 68)},
    "lenet5": {"Han 2015": (0.77, 12), "DNS": (0.91, 108), "Sparse VD": (0.75, 280)},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["lenet300100", "lenet5"], default="lenet300100")
    parser.add_argument("--penalty", choices=sorted(REGULARIZERS), default="hoyer_square")
    parser.add_argument("--strength", type=float, nargs="+", default=[1e-4],
                        help="regularization strengths α to sweep")
    parser.add_argument("--prune-rule", choices=["std", "group", "group_std"], default="std",
                        help="std: |w| < s·std(w) per tensor; group: units with norm < s·max; "
                             "group_std: units with norm < --group-threshold·max, then the std "
                             "rule with s on what is left")
    parser.add_argument("--group-threshold", type=float, default=0.2,
                        help="relative group-norm threshold of the group_std rule")
    parser.add_argument("--threshold-scale", type=float, nargs="+", default=[0.03],
                        help="pruning thresholds s to sweep")
    parser.add_argument("--reg-epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--finetune-learning-rate", type=float, default=1e-4)
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout on hidden activations during regularized training and "
                             "fine-tuning (lenet300100 only)")
    parser.add_argument("--weight-decay", type=float, default=0.0,
                        help="β of the β‖W‖² term (L2, in the gradient) during regularized "
                             "training and fine-tuning")
    parser.add_argument("--dense-workdir", default=None,
                        help="train_dense.py workdir to start from (default runs/dense_<model>)")
    parser.add_argument("--baseline", action="store_true",
                        help="also run one-shot magnitude pruning of the dense model to the same "
                             "per-layer counts, fine-tuned the same way")
    parser.add_argument("--gradual-baseline", action="store_true",
                        help="also run Zhu-Gupta gradual magnitude pruning to the same per-layer "
                             "sparsity (in place of the regularized stage), then the same "
                             "fine-tune")
    common.add_distill_args(parser)
    common.add_common_args(parser)
    return parser.parse_args(argv)


def run_stage(model, tx, dataset, params, epochs, directory, args, config, select_best=True):
    return common.train_stage(model, tx, dataset, params, epochs, directory,
                              batch_size=args.batch_size, seed=args.seed, config=config,
                              select_best=select_best,
                              progress=not args.no_progress)


def finetune(model, dataset, params, masks, directory, args, config, teacher):
    return common.masked_finetune(
        model, dataset, params, masks, directory, epochs=args.finetune_epochs,
        learning_rate=args.finetune_learning_rate, batch_size=args.batch_size, seed=args.seed,
        weight_decay=args.weight_decay, teacher=teacher, config=config,
        progress=not args.no_progress)


def gradual_baseline(model, dataset, dense, point, key, args, config, directory, teacher):
    """Zhu-Gupta gradual magnitude pruning from the dense model to ``point``'s per-layer
    sparsity over the regularized stage's epochs (pruning ends at 75%), then the same fine-tune;
    the result is labelled with ``key``."""
    steps_per_epoch = len(dataset.train) // args.batch_size
    total = args.reg_epochs * steps_per_epoch
    sparsity = {l["name"]: 1 - l["kept_fraction"] for l in point["report"]["layers"]}
    tx = optax.chain(make_optimizer("adam", args.learning_rate, total_steps=total,
                                    weight_decay=args.weight_decay),
                     gradual_magnitude_pruning(sparsity, begin_step=0, end_step=int(0.75 * total),
                                               frequency=max(steps_per_epoch // 2, 1)))
    pruned = run_stage(model, tx, dataset, dense, args.reg_epochs, directory / "prune", args,
                       {**config, "stage": "gradual"}, select_best=False)
    masks = masks_lib.nonzero_masks(pruned)
    tuned = finetune(model, dataset, pruned, masks, directory / "finetune", args,
                     {**config, "stage": "gradual_finetune"}, teacher)
    return {**evaluate_point(model, dataset, tuned, "gradual_magnitude", key),
            "checkpoint": str(directory / "finetune")}


def prune_masks(params, rule, scale, group_threshold):
    """The masks of one pruning rule (see ``--prune-rule``)."""
    if rule == "std":
        return masks_lib.std_threshold_masks(params, scale)
    if rule == "group":
        return masks_lib.group_masks(params, fraction_of_max=scale, grouping="both")
    structured = masks_lib.group_masks(params, fraction_of_max=group_threshold, grouping="both")
    return masks_lib.std_threshold_masks(masks_lib.apply_masks(params, structured), scale)


def evaluate_point(model, dataset, params, label, extra):
    report = masks_lib.sparsity_report(params, model, dataset.image_shape)
    val = predict_accuracy(model, params, {}, dataset.validation.images, dataset.validation.labels)
    test = predict_accuracy(model, params, {}, dataset.test.images, dataset.test.labels)
    return {"method": label, **extra, "val_error": 100 * (1 - val), "test_error": 100 * (1 - test),
            "compression": report.compression, "kept_fraction": report.kept_fraction,
            "architecture": report.architecture,
            "flops_reduction_sparse": report.flops("dense") / report.flops("sparse"),
            "flops_reduction_structured": report.flops("dense") / report.flops("structured"),
            "report": report.as_dict(), "markdown": report.markdown()}


def main(argv=None):
    args = parse_args(argv)
    name = f"deephoyer_{args.model}_{args.penalty}"
    out = common.workdir(args, name)
    dataset = load_dataset("mnist", args.data_dir)
    model = create_model(args.model, **({"dropout_rate": args.dropout} if args.dropout else {}))
    dense = common.restore_dense(args, create_model(args.model), dataset)
    results_path = out / "results.json"
    points = json.loads(results_path.read_text())["points"] if results_path.exists() else []
    started = time.perf_counter()
    dense_point = evaluate_point(model, dataset, dense, "dense", {})

    # Directory suffixes keep runs of other pruning rules / fine-tunes from resuming each other.
    rule_suffix = ("" if args.prune_rule == "std" else f"_{args.prune_rule}") + (
        "_distill" if args.distill else "")
    teacher = frozen_teacher(create_model(args.model), dense) if args.distill else None
    for strength in args.strength:
        reg_steps = args.reg_epochs * (len(dataset.train) // args.batch_size)
        tx = optax.chain(REGULARIZERS[args.penalty](strength),
                         make_optimizer("adam", args.learning_rate, total_steps=reg_steps,
                                        weight_decay=args.weight_decay))
        reg_dir = out / f"reg_a{strength:g}"
        config = {"stage": "regularize", "penalty": args.penalty, "strength": strength,
                  **{k: v for k, v in vars(args).items() if k not in ("strength",
                                                                      "threshold_scale")}}
        # The last regularized epoch, not the best-validation one: sparsity is the point of
        # this stage and accuracy is recovered by the fine-tune, where selection happens.
        regularized = run_stage(model, tx, dataset, dense, args.reg_epochs, reg_dir, args,
                                config, select_best=False)
        for scale in args.threshold_scale:
            # What identifies a point of this sweep (older results lack the last two fields).
            key = {"strength": strength, "threshold_scale": scale,
                   "prune_rule": args.prune_rule, "distill": args.distill}
            defaults = {"prune_rule": "std", "distill": False}

            def existing(method):
                return next((p for p in points if p["method"] == method and all(
                    p.get(k, defaults.get(k)) == v for k, v in key.items())), None)

            point = existing(args.penalty)
            if point is None:
                masks = prune_masks(regularized, args.prune_rule, scale, args.group_threshold)
                ft_dir = out / f"ft_a{strength:g}_s{scale:g}{rule_suffix}"
                tuned = finetune(model, dataset, regularized, masks, ft_dir, args,
                                 {**config, "stage": "finetune", "threshold_scale": scale},
                                 teacher)
                point = evaluate_point(model, dataset, tuned, args.penalty, key)
                # hoyertrim.load(point["checkpoint"]) gives this point's network.
                point.update(checkpoint=str(ft_dir), regularized_checkpoint=str(reg_dir))
                points.append(point)
            print(f"{args.penalty} α={strength:g} s={scale:g}: test error {point['test_error']:.2f}%"
                  f" at {point['compression']:.1f}x ({point['architecture']}), FLOPs /"
                  f"{point['flops_reduction_structured']:.1f} structured, "
                  f"/{point['flops_reduction_sparse']:.1f} sparse")
            if args.baseline and existing("magnitude") is None:
                counts = {l["name"]: l["kept_weights"] for l in point["report"]["layers"]}
                base_dir = out / f"magnitude_a{strength:g}_s{scale:g}{rule_suffix}"
                base = finetune(model, dataset, dense, masks_lib.count_masks(dense, counts),
                                base_dir, args,
                                {**config, "stage": "magnitude", "threshold_scale": scale},
                                teacher)
                points.append({**evaluate_point(model, dataset, base, "magnitude", key),
                               "checkpoint": str(base_dir)})
                print(f"  magnitude (one-shot), same per-layer counts: test error "
                      f"{points[-1]['test_error']:.2f}%")
            if args.gradual_baseline and existing("gradual_magnitude") is None:
                gradual_dir = out / f"gradual_a{strength:g}_s{scale:g}{rule_suffix}"
                points.append(gradual_baseline(model, dataset, dense, point, key, args, config,
                                               gradual_dir, teacher))
                print(f"  gradual magnitude, same per-layer sparsity: test error "
                      f"{points[-1]['test_error']:.2f}%")
            common.write_json(results_path, {"model": args.model, "penalty": args.penalty,
                                             "dense": dense_point, "points": points,
                                             "environment": common.environment()})
    print(f"done in {time.perf_counter() - started:.0f} s")
    return points


if __name__ == "__main__":
    main()
