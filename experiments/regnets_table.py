"""Net-Trim on differently trained 784-300-1000-100-10 nets (Net-Trim's RQ5): the table.

    python experiments/run.py regnets_plain regnets_dropout regnets_l1 regnets_hs
    python experiments/regnets_table.py

For each pipeline: the trained (or regularized) network's test accuracy (evaluated once, by
`pipeline.evaluate`), Net-Trim cascade ε = 0.1 without fine-tune (kept %, test accuracy), and
magnitude pruning of the same network to exactly Net-Trim's per-layer nonzero counts. Writes
results/regnets.json and prints the Markdown table.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

import common  # noqa: F401  (silences jaxopt's deprecation warning)
from hoyertrim import masks, pipeline
from hoyertrim.train import predict_accuracy

NAMES = {"regnets_plain": "plain", "regnets_dropout": "dropout 0.3",
         "regnets_l1": "+ 30 epochs L1 2e-5", "regnets_hs": "+ 30 epochs HS 1e-4",
         "regnets_plain_refit": "plain; Net-Trim + re-fit",
         "regnets_l1_refit": "+ 30 epochs L1 2e-5; Net-Trim + re-fit",
         "regnets_hs_refit": "+ 30 epochs HS 1e-4; Net-Trim + re-fit"}


def main():
    rows = {}
    for name, label in NAMES.items():
        if not pathlib.Path(f"results/pipelines/{name}.json").is_file():
            print(f"(no results/pipelines/{name}.json: run python experiments/run.py {name})")
            continue
        payload = json.loads(pathlib.Path(f"results/pipelines/{name}.json").read_text())
        stages = {stage["stage"]: stage["directory"] for stage in payload["stages"]}
        parent = pathlib.Path(stages.get("regularize") or stages["train"])
        evaluated = parent / "evaluation-test.json"
        parent_test = json.loads(evaluated.read_text()) if evaluated.is_file() \
            else pipeline.evaluate(parent)
        trimmed, base = pipeline.load(stages["nettrim"]), pipeline.load(parent)
        test = pipeline.load_data(trimmed.manifest, None).test
        counts = {layer: int(np.count_nonzero(np.asarray(p["kernel"])))
                  for layer, p in trimmed.params.items()}
        same_counts = masks.apply_masks(base.params, masks.count_masks(base.params, counts))
        nettrim_test = json.loads((pathlib.Path(stages["nettrim"])
                                   / "evaluation-test.json").read_text())
        results = trimmed.manifest["results"]
        rows[name] = {
            "training": label, "network": str(parent), "test": parent_test["accuracy"],
            "nettrim": stages["nettrim"], "kept_fraction": results["kept_fraction"],
            "per_layer_kept": {k: v["kept_fraction"] for k, v in results["layers"].items()},
            "nettrim_test": nettrim_test["accuracy"],
            "magnitude_same_counts_test": predict_accuracy(base.model, same_counts, {},
                                                           test.images, test.labels)}
    pathlib.Path("results/regnets.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("| training | test % | Net-Trim kept % (per layer) | Net-Trim test % | "
          "magnitude, same counts |\n|---|---|---|---|---|")
    for row in rows.values():
        layers = " / ".join(f"{100 * v:.1f}" for v in row["per_layer_kept"].values())
        print(f"| {row['training']} | {100 * row['test']:.2f} | {100 * row['kept_fraction']:.2f}"
              f" ({layers}) | {100 * row['nettrim_test']:.2f} | "
              f"{100 * row['magnitude_same_counts_test']:.2f} |")


if __name__ == "__main__":
    main()
