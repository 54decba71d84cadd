"""The whole-units comparison's table: certified structured Net-Trim against group-norm pruning.

    python experiments/run.py units_nettrim_lenet300100_50 …    # one results file per point
    python experiments/units_table.py                           # → docs/structured.md

Reads ``results/pipelines/units_<method>[_ft]_lenet300100_<sparsity>[_seed<k>].json`` (written
by `run.py`; the test split evaluated once per point there) and writes, per unit sparsity and
method, the test accuracy without and with the short fine-tune (mean and range over the seeds
found), the units each layer keeps and the compact model's stored weights.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import common

METHODS = {"nettrim": "Net-Trim `--units` (cascade, certified)",
           "norm": "group-norm pruning of the same units (`prune --rule units`)"}


def _runs(results: pathlib.Path, name: str) -> list[dict]:
    found = []
    for suffix in ("", "_seed1", "_seed2"):
        path = results / f"{name}{suffix}.json"
        if path.is_file():
            found.append(json.loads(path.read_text()))
    return found


def _accuracy(runs: list[dict]) -> str:
    if not runs:
        return "–"
    values = [100 * run["test"][-1]["accuracy"] for run in runs]
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f}%"
    return f"{mean:.2f}% ({min(values):.2f}–{max(values):.2f}, {len(values)} seeds)"


def table(results: pathlib.Path) -> str:
    lines = ["| units removed | method | test accuracy, no fine-tune | with 5 epochs of "
             "fine-tune | units kept (pixels-hidden-hidden) | compact model's weights |",
             "|---|---|---|---|---|---|"]
    dense = None
    for sparsity in ("50", "70"):
        for method, label in METHODS.items():
            plain = _runs(results, f"units_{method}_lenet300100_{sparsity}")
            tuned = _runs(results, f"units_{method}_ft_lenet300100_{sparsity}")
            if not plain:
                continue
            dense = plain[0]["test"][0]
            pruned = plain[0]["stages"][1]["results"]
            compact = plain[0]["stages"][-1]["results"]
            lines.append(f"| {sparsity}% | {label} | {_accuracy(plain)} | {_accuracy(tuned)} | "
                         f"{pruned['architecture']} | {compact['weights_stored']:,} |")
    if dense is None:
        raise SystemExit(f"No units_* results under {results}: run experiments/run.py first.")
    lines.insert(2, f"| 0 | dense LeNet-300-100 | {100 * dense['accuracy']:.2f}% | – | "
                    "784-300-100 | 266,200 |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/pipelines")
    parser.add_argument("--out", default="docs/structured.md")
    args = parser.parse_args(argv)
    text = table(pathlib.Path(args.results))
    out = pathlib.Path(args.out)
    out.write_text(common.fill_table(out.read_text() if out.is_file() else "", "units", text,
                                     append=True))
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
