"""Net-Trim on differently trained 784-300-1000-100-10 nets (Net-Trim's RQ5): the table.

    python experiments/run.py regnets_{plain,dropout,l1,hs}{,_magnitude} \
        regnets_{plain,l1,hs}_refit{,_magnitude}
    python experiments/regnets_table.py

For each training: the trained (or regularized) network's test accuracy, Net-Trim cascade
ε = 0.1 without fine-tune (kept %, per layer, test accuracy), and magnitude pruning of the same
network to exactly Net-Trim's per-layer nonzero counts (``oneshot --method magnitude --like``),
all read from the pipelines' results files (the test set evaluated once per point there).
Writes results/regnets.json and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import pathlib

NAMES = {"regnets_plain": "plain", "regnets_dropout": "dropout 0.3",
         "regnets_l1": "+ 30 epochs L1 2e-5", "regnets_hs": "+ 30 epochs HS 1e-4",
         "regnets_plain_refit": "plain; Net-Trim + re-fit",
         "regnets_l1_refit": "+ L1; Net-Trim + re-fit",
         "regnets_hs_refit": "+ HS; Net-Trim + re-fit"}


def row(results: pathlib.Path, name: str, label: str) -> dict | None:
    """One training's figures from ``<name>.json`` and ``<name>_magnitude.json``."""
    paths = [results / f"{name}.json", results / f"{name}_magnitude.json"]
    missing = [path.stem for path in paths if not path.is_file()]
    if missing:
        print(f"(no results for {', '.join(missing)}: run python experiments/run.py "
              f"{' '.join(missing)})")
        return None
    trimmed, magnitude = (json.loads(path.read_text()) for path in paths)
    nettrim = trimmed["stages"][-1]
    layers = nettrim["results"]["layers"]
    # The network Net-Trim pruned: the regularized one, else the dense one (evaluated before).
    return {"training": label, "test": trimmed["test"][-2]["accuracy"],
            "kept_fraction": nettrim["results"]["kept_fraction"],
            "per_layer_kept": {k: v["kept_fraction"] for k, v in layers.items()},
            "nettrim_test": trimmed["test"][-1]["accuracy"],
            "magnitude_same_counts_test": magnitude["test"][-1]["accuracy"],
            "magnitude_kept_fraction": magnitude["stages"][-1]["results"]["kept_fraction"]}


def table(rows: dict) -> str:
    lines = ["| training | test % | Net-Trim kept % (per layer) | Net-Trim test % | "
             "magnitude, same counts |", "|---|---|---|---|---|"]
    for r in rows.values():
        layers = " / ".join(f"{100 * v:.1f}" for v in r["per_layer_kept"].values())
        lines.append(f"| {r['training']} | {100 * r['test']:.2f} | "
                     f"{100 * r['kept_fraction']:.2f} ({layers}) | "
                     f"{100 * r['nettrim_test']:.2f} | "
                     f"{100 * r['magnitude_same_counts_test']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/pipelines",
                        help="folder of the pipelines' results files")
    parser.add_argument("--out", default="results/regnets.json")
    args = parser.parse_args(argv)
    rows = {}
    for name, label in NAMES.items():
        found = row(pathlib.Path(args.results), name, label)
        if found is not None:
            rows[name] = found
    pathlib.Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows), end="")
    return rows


if __name__ == "__main__":
    main()
