"""The MNIST Net-Trim tables of docs/results_mnist.md, read from `run.py`'s results files.

    python experiments/run.py peers_nettrim_cascade_lenet300100_90 …   # one results file per point
    python experiments/mnist_tables.py                                 # → docs/results_mnist.md

Three tables, each between its markers in the page (the prose around them is written by hand):

- ``peers``: Net-Trim (parallel, cascade) against SparseGPT, Wanda and magnitude on LeNet-300-100
  at the same sparsity (``peers_<method>_lenet300100_<sparsity|2to4>``): test accuracy without
  fine-tune → after the same masked fine-tune.
- ``epsilon``: Net-Trim at ε against magnitude pruning to Net-Trim's per-layer counts
  (``epsilon_[magnitude_]<scheme>_lenet300100_<ε>``), without and with the same fine-tune.
- ``user``: Net-Trim on the models of examples/user_models.py (``user_<model>_<scheme>``), every
  layer's certified ε against its measured discrepancy on calibration and held-out images.

The test split was evaluated once per point by `run.py`; this script only reads.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import common
from hoyertrim.nettrim import certified_epsilon

PEERS = {"nettrim_parallel": "Net-Trim parallel", "nettrim_cascade": "Net-Trim cascade",
         "sparsegpt": "SparseGPT", "wanda": "Wanda", "magnitude": "magnitude"}
SPARSITIES = ("50", "70", "80", "90", "95", "2to4")
EPSILONS = ("0.05", "0.1", "0.2", "0.3", "0.4")
USER_MODELS = {"flax_cnn": "The Flax examples' MNIST CNN (`FlaxExampleCNN`)",
               "conv_bn": "Conv → BatchNorm → ReLU CNN (`ConvBNNet`)"}


def _load(results: pathlib.Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _test(run: dict, stage: int) -> float:
    """Test accuracy in percent after the ``stage``-th stage of the chain (0 = dense)."""
    return 100 * run["test"][stage]["accuracy"]


def _pruned(run: dict) -> dict:
    return run["stages"][1]["results"]


def _per_layer_kept(pruned: dict) -> str:
    return " / ".join(f"{100 * layer['kept_fraction']:.1f}" for layer in pruned["layers"].values())


def peers_table(results: pathlib.Path) -> str:
    lines = ["| sparsity | " + " | ".join(PEERS.values()) + " |",
             "|---|" + "---|" * len(PEERS)]
    for sparsity in SPARSITIES:
        cells = []
        for method in PEERS:
            run = _load(results, f"peers_{method}_lenet300100_{sparsity}")
            if run is None:
                cells.append("–")
                continue
            cell = f"{_test(run, 1):.2f} → {_test(run, 2):.2f}"
            if sparsity == "2to4":
                cell += f" ({100 * _pruned(run)['kept_fraction']:.1f}% kept)"
            cells.append(cell)
        label = "2:4" if sparsity == "2to4" else f"{sparsity}%"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def epsilon_table(results: pathlib.Path) -> str:
    lines = ["| scheme | ε | kept % (per layer) | Net-Trim test % | magnitude, same counts | "
             "+ 8-epoch fine-tune: Net-Trim / magnitude | held-out top-1 agreement: Net-Trim / "
             "magnitude |", "|---|---|---|---|---|---|---|"]
    for scheme in ("parallel", "cascade"):
        for epsilon in EPSILONS:
            nettrim = _load(results, f"epsilon_{scheme}_lenet300100_{epsilon}")
            magnitude = _load(results, f"epsilon_magnitude_{scheme}_lenet300100_{epsilon}")
            if nettrim is None or magnitude is None:
                continue
            pruned = _pruned(nettrim)
            lines.append(
                f"| {scheme} | {epsilon} | {100 * pruned['kept_fraction']:.2f} "
                f"({_per_layer_kept(pruned)}) | {_test(nettrim, 1):.2f} | {_test(magnitude, 1):.2f} | "
                f"{_test(nettrim, 2):.2f} / {_test(magnitude, 2):.2f} | "
                f"{100 * pruned['heldout']['top1_agreement']:.1f}% / "
                f"{100 * _pruned(magnitude)['heldout']['top1_agreement']:.1f}% |")
    return "\n".join(lines)


def user_table(results: pathlib.Path) -> str:
    blocks = []
    for model, title in USER_MODELS.items():
        rows = []
        for scheme in ("parallel", "cascade"):
            run = _load(results, f"user_{model}_{scheme}")
            if run is None:
                continue
            pruned = _pruned(run)
            layers = "<br>".join(
                f"{name}: {layer['program']}, {100 * layer['kept_fraction']:.1f}%, "
                f"{certified_epsilon(layer):.4f} / {layer['measured']:.4f} / {layer['heldout_measured']:.4f}"
                for name, layer in pruned["layers"].items())
            rows.append(
                f"| {scheme} | {run['stages'][1]['settings']['epsilon']} | "
                f"{100 * pruned['kept_fraction']:.2f} | {_test(run, 0):.2f} → {_test(run, 1):.2f} | "
                f"{100 * pruned['heldout']['top1_agreement']:.1f}% | "
                f"{pruned['heldout']['logits_relative_error']:.3f} | {layers} |")
        if rows:
            blocks.append("\n".join([
                f"**{title}**", "",
                "| scheme | ε | kept % | test % (dense → pruned) | held-out top-1 agreement | "
                "held-out logits rel. error | per layer: program, kept %, certified ε / measured "
                "(calibration) / measured (held-out) |", "|---|---|---|---|---|---|---|", *rows]))
    return "\n\n".join(blocks)


TABLES = {"peers": peers_table, "epsilon": epsilon_table, "user": user_table}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/pipelines")
    parser.add_argument("--out", default="docs/results_mnist.md")
    args = parser.parse_args(argv)
    results, out = pathlib.Path(args.results), pathlib.Path(args.out)
    text = out.read_text()
    for marker, build in TABLES.items():
        table = build(results)
        if table.count("\n") < 2:
            raise SystemExit(f"No results for the {marker} table under {results}: "
                             "run experiments/run.py first (see this script's docstring).")
        text = common.fill_table(text, marker, table)
        print(table, end="\n\n")
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
