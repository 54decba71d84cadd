"""ResNet-20 on Fashion-MNIST, structured: accuracy against forward FLOPs, one row per pipeline.

    python experiments/run.py dense_resnet20 ghs_resnet20_a0.01 …   # one results file each
    python experiments/resnet_table.py                              # → docs/structured.md

Reads ``results/pipelines/<name>.json`` for the names in `ROWS` that exist (written by `run.py`,
the test split evaluated once per stage there) and writes a table — test accuracy of each
stage after the dense one, the structured FLOPs ratio (the dense network's forward FLOPs over
those of the surviving units' dense kernels, `masks.sparsity_report`), the units each layer
keeps, the compact model's stored weights — and the accuracy-vs-FLOPs plot
``docs/resnet20_frontier.png``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import common
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROWS = {
    "ghs_resnet20_a0.01": "Group-HS α 1e-2 with the stream's coupled groups (2 epochs) → groups "
                          "< 5% of max → 1 distilled epoch",
    "ghs_resnet20_a0.03": "Group-HS α 3e-2 (2 epochs) → groups < 5% of max → 1 distilled epoch",
    "glasso_resnet20_a0.0001": "group lasso α 1e-4, the same recipe",
    "groups_magnitude_resnet20": "group-norm pruning of the dense network at Group-HS's FLOPs "
                                 "→ 1 distilled epoch",
    "units_nettrim_resnet20_50": "Net-Trim `--units` 50% of every conv's input channels "
                                 "(cascade, certified), no fine-tune",
    "units_norm_resnet20_50": "group-norm pruning of half of every conv's input channels "
                              "(`prune --rule units`), no fine-tune",
    "units_nettrim_ft_resnet20_50": "Net-Trim `--units` 50%, 1 masked epoch",
    "units_norm_ft_resnet20_50": "group-norm pruning 50%, 1 masked epoch",
}


def flops_ratio(entry: dict) -> float:
    layers = entry["sparsity"]["layers"]
    return sum(l["dense_flops"] for l in layers) / sum(l["structured_flops"] for l in layers)


def rows(results: pathlib.Path) -> tuple[dict | None, list[dict]]:
    dense, found = None, []
    for name, label in ROWS.items():
        path = results / f"{name}.json"
        if not path.is_file():
            continue
        run = json.loads(path.read_text())
        tests = run["test"]
        dense = tests[0]
        final = tests[-1]
        compact = run["stages"][-1]["results"] if run["stages"][-1]["stage"] == "compact" else {}
        found.append({"name": name, "label": label, "accuracy": final["accuracy"],
                      "stages": [(t["stage"], t["accuracy"]) for t in tests[1:]],
                      "flops_ratio": flops_ratio(final),
                      "architecture": final["sparsity"]["architecture"],
                      "weights": compact.get("weights_stored")})
    return dense, found


def table(dense: dict, found: list[dict]) -> str:
    lines = ["| method | test accuracy (each stage after the dense one) | Δ vs dense (points) | "
             "structured FLOPs ratio | units kept per layer | compact weights |",
             "|---|---|---|---|---|---|",
             f"| dense ResNet-20 (10 epochs) | {100 * dense['accuracy']:.2f}% | – | 1.00x | "
             f"{dense['sparsity']['architecture']} | {dense['sparsity']['weights']:,} |"]
    for row in found:
        stages = " → ".join(f"{100 * a:.2f}% ({s})" for s, a in row["stages"])
        delta = 100 * (row["accuracy"] - dense["accuracy"])
        weights = "–" if row["weights"] is None else f"{row['weights']:,}"
        lines.append(f"| {row['label']} | {stages} | {delta:+.2f} | {row['flops_ratio']:.2f}x | "
                     f"{row['architecture']} | {weights} |")
    return "\n".join(lines)


def plot(dense: dict, found: list[dict], out: pathlib.Path) -> None:
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    axes.axhline(100 * dense["accuracy"], color="gray", linestyle="--", label="dense")
    for row in found:
        axes.scatter(row["flops_ratio"], 100 * row["accuracy"], s=30)
        axes.annotate(row["name"].replace("_resnet20", ""), (row["flops_ratio"],
                      100 * row["accuracy"]), fontsize=7, xytext=(4, 2),
                      textcoords="offset points")
    axes.set_xlabel("fewer forward FLOPs (structured, dense / kept)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("ResNet-20 on Fashion-MNIST, structured pruning")
    axes.legend(loc="lower left")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/pipelines")
    parser.add_argument("--out", default="docs/structured.md")
    parser.add_argument("--plot", default="docs/resnet20_frontier.png")
    args = parser.parse_args(argv)
    dense, found = rows(pathlib.Path(args.results))
    if dense is None:
        raise SystemExit(f"No ResNet-20 results under {args.results}: run experiments/run.py.")
    text = table(dense, found)
    plot(dense, found, pathlib.Path(args.plot))
    out = pathlib.Path(args.out)
    out.write_text(common.fill_table(out.read_text(), "resnet20", text, append=True))
    print(text)
    print(f"wrote {out} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
