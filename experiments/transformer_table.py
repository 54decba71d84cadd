"""The transformer comparison's tables (GPT, ViT) and plot, from the pipelines' results files.

    python experiments/run.py gpt_nettrim_50 …            # one results file per point
    python experiments/transformer_table.py               # → docs/transformers.md + PNG

Reads ``results/pipelines/gpt_<method>_<sparsity>.json`` (written by `run.py`; the test split is
evaluated once per point there) and writes the Markdown table of test perplexity, bits per byte,
next-byte accuracy, top-1 agreement with the dense model and whole-network pruning time, and
one plot of test perplexity against sparsity per method; the ViT's table; the same short
fine-tune after each method (``*_ft``); the headline points over three calibration samples
(``*_seed1``, ``*_seed2``).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("nettrim", "nettrimpolish", "sparsegpt", "wanda", "magnitude")
POINTS = ("50", "60", "70", "80", "2to4")
LABELS = {"nettrim": "Net-Trim (cascade, kept fraction)",
          "nettrimpolish": "Net-Trim + polish 2 (re-fit without ℓ1)", "sparsegpt": "SparseGPT",
          "wanda": "Wanda", "magnitude": "magnitude"}



def _agreement(evaluation: dict) -> float:
    """The top-1 agreement with the dense model (evaluations written before 2026-12-06 call it
    ``agreement``)."""
    return evaluation.get("top1_agreement", evaluation.get("agreement"))

def _point(results: pathlib.Path, name: str):
    """(dense test result, pruned test result, pruning stage's results) of one pipeline's
    results file, or None when it has not been run."""
    path = results / f"{name}.json"
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    return payload["test"][0], payload["test"][-1], payload["stages"][-1]["results"]


def _rows(results: pathlib.Path) -> tuple[dict, dict]:
    dense, rows = None, {}
    for method in METHODS:
        for point in POINTS:
            found = _point(results, f"gpt_{method}_{point}")
            if found is None:
                continue
            dense, pruned, stage = found
            rows[method, point] = {"perplexity": pruned["perplexity"],
                                   "bits_per_byte": pruned["bits_per_byte"],
                                   "accuracy": pruned["accuracy"],
                                   "agreement": _agreement(pruned),
                                   "kept_fraction": stage["kept_fraction"],
                                   "seconds": stage["solve_seconds"]}
    return dense, rows


def _label(method: str, point: str) -> str:
    if method == "nettrim" and point == "2to4":
        return "Net-Trim (cascade, N:M mode: re-fit on the pattern)"
    return LABELS[method]


def _vit_table(results: pathlib.Path) -> str:
    """The ViT's rows (``results/pipelines/vit_*.json``): test accuracy and agreement."""
    lines, dense = [], None
    for point in ("50", "70", "2to4"):
        for method in METHODS:
            found = _point(results, f"vit_{method}_{point}")
            if found is None:
                continue
            dense, pruned, stage = found
            label = "2:4" if point == "2to4" else f"{point}%"
            name = _label(method, point)
            lines.append(f"| {label} | {name} | {100 * pruned['accuracy']:.2f}% | "
                         f"{100 * _agreement(pruned):.2f}% | {stage['kept_fraction']:.3f} | "
                         f"{stage['solve_seconds']:.1f} |")
    if dense is None:
        return ""
    return "\n".join([
        "| sparsity | method | test accuracy | agreement with dense | kept | pruning seconds |",
        "|---|---|---|---|---|---|",
        f"| 0 (dense) | – | {100 * dense['accuracy']:.2f}% | – | 1.0 | – |", *lines])


def _metric(model: str, result: dict) -> str:
    return (f"{result['perplexity']:.3f}" if model == "gpt"
            else f"{100 * result['accuracy']:.2f}%")


def _finetune_table(results: pathlib.Path, model: str) -> str:
    """Each method before and after the same short fine-tune (``<model>_<method>_<point>_ft``)."""
    lines = []
    for point in ("50", "70", "2to4"):
        for method in METHODS:
            after = _point(results, f"{model}_{method}_{point}_ft")
            if after is None:
                continue
            _, pruned, _ = _point(results, f"{model}_{method}_{point}") or after
            label = "2:4" if point == "2to4" else f"{point}%"
            lines.append(f"| {label} | {_label(method, point)} | {_metric(model, pruned)} | "
                         f"{_metric(model, after[1])} |")
    if not lines:
        return ""
    what = "test perplexity" if model == "gpt" else "test accuracy"
    return "\n".join([f"| sparsity | method | {what}, no fine-tune | {what}, fine-tuned |",
                      "|---|---|---|---|", *lines])


def _seeds_table(results: pathlib.Path, model: str) -> str:
    """The headline points over calibration samples 0, 1, 2: mean and range."""
    lines = []
    for point in ("50", "70", "2to4"):
        for method in METHODS:
            found = [_point(results, f"{model}_{method}_{point}" + suffix)
                     for suffix in ("", "_seed1", "_seed2")]
            if any(f is None for f in found):
                continue
            key = "perplexity" if model == "gpt" else "accuracy"
            scale = 1 if model == "gpt" else 100
            values = [scale * f[1][key] for f in found]
            label = "2:4" if point == "2to4" else f"{point}%"
            unit, digits = ("", 3) if model == "gpt" else ("%", 2)
            lines.append(f"| {label} | {_label(method, point)} | "
                         f"{sum(values) / 3:.{digits}f}{unit} | {min(values):.{digits}f}–"
                         f"{max(values):.{digits}f}{unit} |")
    if not lines:
        return ""
    what = "test perplexity" if model == "gpt" else "test accuracy"
    return "\n".join([f"| sparsity | method | {what}, mean of 3 samples | range |",
                      "|---|---|---|---|", *lines])


def _replace_block(text: str, name: str, table: str) -> str:
    start, end = f"<!-- {name} start -->", f"<!-- {name} end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + start + "\n" + table + "\n" + end + rest.split(end, 1)[1]
    return f"{text}\n{start}\n{table}\n{end}\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/pipelines")
    parser.add_argument("--out", default="docs/transformers.md")
    args = parser.parse_args(argv)
    dense, rows = _rows(pathlib.Path(args.results))
    if dense is None:
        raise SystemExit(f"No results/pipelines/gpt_*.json under {args.results}: run "
                         "experiments/run.py gpt_nettrim_50 … first.")
    lines = [
        "| sparsity | method | test perplexity | bits per byte | next-byte accuracy | "
        "agreement with dense | kept | pruning seconds |",
        "|---|---|---|---|---|---|---|---|",
        f"| 0 (dense) | – | {dense['perplexity']:.3f} | {dense['bits_per_byte']:.3f} | "
        f"{100 * dense['accuracy']:.2f}% | – | 1.0 | – |"]
    for point in POINTS:
        for method in METHODS:
            row = rows.get((method, point))
            if row is None:
                continue
            label = "2:4" if point == "2to4" else f"{point}%"
            lines.append(f"| {label} | {_label(method, point)} | {row['perplexity']:.3f} | "
                         f"{row['bits_per_byte']:.3f} | {100 * row['accuracy']:.2f}% | "
                         f"{100 * row['agreement']:.2f}% | {row['kept_fraction']:.3f} | "
                         f"{row['seconds']:.1f} |")
    out = pathlib.Path(args.out)
    figure = out.with_name("transformers_gpt_perplexity.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        points = [(int(p), rows[method, p]["perplexity"]) for p in POINTS[:-1]
                  if (method, p) in rows]
        if points:
            ax.plot(*zip(*points), marker="o", label=LABELS[method])
    ax.axhline(dense["perplexity"], color="gray", linestyle="--", label="dense")
    ax.set_xlabel("sparsity (%) of every linear map")
    ax.set_ylabel("test perplexity (bytes)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    table = "\n".join(lines)
    text = _replace_block(out.read_text() if out.is_file() else "", "gpt table", table)
    results = pathlib.Path(args.results)
    vit = _vit_table(results)
    blocks = {"vit table": vit}
    for model in ("gpt", "vit"):
        blocks[f"{model} finetune table"] = _finetune_table(results, model)
        blocks[f"{model} seeds table"] = _seeds_table(results, model)
    for name, block in blocks.items():
        if block:
            text = _replace_block(text, name, block)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(table)
    for block in blocks.values():
        print(block)
    print(f"wrote {out} and {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
