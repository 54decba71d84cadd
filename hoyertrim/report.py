"""A report of stage directories (`pipeline`): Markdown plus PNGs a person wants to read.

`write_report(directories, out)` writes ``report.md`` and, where the stages have what they show:

- ``kept_per_layer.png``: kept % of each layer's weights, per stage;
- ``first_layer_pixels.png``: for a first Dense layer on images, how many weights still read
  each pixel (which pixels the pruned net still looks at);
- ``accuracy_vs_kept.png``: accuracy against kept % (log), the chain's dense model as a line,
  published points for zoo models, fine-tuned points where the stages include them;
- ``nettrim_certificates.png``: per layer, Net-Trim's certified ε and the discrepancy measured
  by running the pruned model, on the calibration and on held-out images (a one-shot peer's
  panel has only the measured bars: it certifies nothing); one panel per stage;
- ``lambda_path.png``: each Net-Trim layer's λ search (discrepancy and kept % per solve).

Accuracies drawn together are on one split (test only if every stage was evaluated on it).
The first three figures show at most six stages (the report says which were left out; every
stage is in its table); labels are the methods' names, not folder names.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
from typing import Sequence

import numpy as np

from hoyertrim.nettrim import certified_epsilon
from hoyertrim.pipeline import StageError, directory_bytes, linked, load, read_manifest

# (test error %, compression) of published element-wise methods (design.md).
PUBLISHED = {
    "lenet300100": {"Han 2015": (1.59, 12), "DNS": (1.99, 56), "Sparse VD": (1.92, 68)},
    "lenet5": {"Han 2015": (0.77, 12), "DNS": (0.91, 108), "Sparse VD": (0.75, 280)},
}
MAX_SERIES = 6
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def stage_label(manifest: dict) -> str:
    """A human name for a stage: the method and its setting."""
    stage, config = manifest["stage"], manifest.get("config", {})
    if stage == "train":
        return "dense"
    if stage == "import":
        return "trained (imported)"
    if stage == "regularize":
        names = {"hoyer_square": "HS", "group_hoyer_square": "Group-HS", "hoyer": "Hoyer",
                 "l1": "L1", "group_lasso": "group lasso", "transformed_l1": "transformed L1"}
        strength = config["strength"]
        alpha = ", ".join(f"{layer} {value:g}" for layer, value in strength.items()) \
            if isinstance(strength, dict) else f"{strength:g}"
        return f"{names.get(config['penalty'], config['penalty'])} α={alpha}"
    if stage == "gradual":
        if config.get("like"):
            return f"gradual magnitude (counts of {pathlib.Path(config['like']).name})"
        values = set(config["sparsity"].values())
        return "gradual magnitude" + (f" {values.pop():g}" if len(values) == 1 else "")
    if stage == "prune":
        return f"pruned ({config['rule'].replace('_', ' ')} {config['value']:g})"
    if stage == "finetune":
        return "fine-tuned" + (" (distilled)" if config.get("distill") else "")
    if stage in ("nettrim", "oneshot"):
        if config.get("nm"):
            target = "{}:{}".format(*config["nm"])
        elif config.get("epsilon") is not None:
            target = f"ε={config['epsilon']:g}"
        elif config.get("like"):
            target = f"counts of {pathlib.Path(config['like']).name}"
        else:
            target = f"kept {100 * config['kept_fraction']:g}%"
        names = {"sparsegpt": "SparseGPT", "wanda": "Wanda", "magnitude": "magnitude"}
        if stage == "oneshot":
            return f"{names[config['method']]} {target}"
        return f"Net-Trim {config['scheme']} {target}"
    return "compact"


def _chain_label(directory: pathlib.Path, manifests: dict) -> str:
    """The stage's label prefixed by its parents' (up to the dense model), e.g.
    'Net-Trim cascade ε=0.1 → fine-tuned'."""
    parts, current, manifest = [], directory, manifests[directory]
    while manifest is not None:
        if manifest["stage"] not in ("train", "import", "compact"):
            parts.append(stage_label(manifest))
        current = linked(current, manifest, "parent")
        manifest = manifests.get(current) if current else None
        if manifest is None and current:
            try:
                manifest = read_manifest(current)
            except ValueError:
                manifest = None
    return " → ".join(reversed(parts)) or stage_label(manifests[directory])


def _accuracy(directory: pathlib.Path, manifest: dict, split: str | None = None
              ) -> tuple[float | None, str]:
    """Accuracy % and its split: the test set where `hoyertrim evaluate` was run on the stage,
    else the validation split (``split`` asks for one)."""
    file = directory / "evaluation-test.json"
    if split != "validation" and file.is_file():
        return 100 * json.loads(file.read_text())["accuracy"], "test"
    if split == "test":
        return None, "test"
    value = manifest.get("results", {}).get("val_accuracy")
    return (None if value is None else 100 * value), "validation"


def _common_split(paths) -> str:
    """The split one plot shows for all its stages: test only if every one was evaluated on
    it (accuracies on two splits are never drawn together)."""
    return "test" if paths and all((p / "evaluation-test.json").is_file() for p in paths) \
        else "validation"


_RECORD = ".hoyertrim-report.json"  # which stages a report folder shows and which files it wrote


def write_report(directories: Sequence, out, *, force: bool = False) -> pathlib.Path:
    """Writes ``out/report.md`` and its PNGs for the stage directories; returns the report path.

    ``out`` is a new folder, or one that holds only a report hoyertrim wrote (its record lists
    the files); it is replaced as a whole — written beside it, then swapped in — so a failed
    call leaves the old report as it was and no stale figure survives a new one.

    Raises:
      StageError: a directory is not a finished stage; ``out`` holds files hoyertrim did not
        write there; or ``out`` holds a report of other stages (pass ``force=True`` to replace
        it).
    """
    paths = [pathlib.Path(d).expanduser().absolute() for d in directories]
    manifests = {}
    for path in paths:
        manifest = read_manifest(path)
        if manifest.get("status") != "complete":
            raise StageError(f"{path} holds an unfinished {manifest['stage']} stage.")
        manifests[path] = manifest
    out = pathlib.Path(out).expanduser().absolute()
    if out.exists():
        _check_replaceable(out, [str(p) for p in paths], force)
    staging = out.parent / f".{out.name}.writing-{os.getpid()}"
    try:
        staging.mkdir(parents=True)
        figures = _figures(paths, manifests, staging)
        (staging / "report.md").write_text(_markdown(paths, manifests, figures))
        files = sorted(f.name for f in staging.iterdir())
        (staging / _RECORD).write_text(json.dumps({"stages": [str(p) for p in paths],
                                                   "files": files}, indent=1) + "\n")
        if out.exists():
            retired = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, retired)
            os.replace(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out)
    except OSError as error:
        raise StageError(f"Cannot write the report to {out}: {error.strerror or error}.") \
            from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / "report.md"


def _check_replaceable(out: pathlib.Path, stages: list[str], force: bool) -> None:
    if not out.is_dir():
        raise StageError(f"{out} exists and is not a folder; choose another --out.")
    present = sorted(f.name for f in out.iterdir())
    if not present:
        return
    try:
        record = json.loads((out / _RECORD).read_text())
        ours = set(record["files"]) | {_RECORD}
        shown = list(record["stages"])
    except (OSError, ValueError, KeyError, TypeError):
        raise StageError(f"{out} holds files hoyertrim did not write there; choose another "
                         "--out (a report folder is replaced as a whole).") from None
    foreign = [name for name in present if name not in ours]
    if foreign:
        listed = ", ".join(foreign[:3]) + (", …" if len(foreign) > 3 else "")
        raise StageError(f"{out} holds files hoyertrim did not write there ({listed}); choose "
                         "another --out (a report folder is replaced as a whole).")
    if shown != stages and not force:
        raise StageError(f"{out} holds a report of other stages ({len(shown)} listed); pass "
                         "--force to replace it, or choose another --out.")


def _sparse_stages(paths, manifests):
    return [p for p in paths if "sparsity" in manifests[p].get("results", {})]


def _subplots(*args, figsize, **kwargs):
    """A figure and its axes, with no pyplot: no global backend or figure registry touched."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def _grid(count: int):
    """Axes for ``count`` panels, three to a row (unused ones hidden)."""
    rows = math.ceil(count / 3)
    columns = min(count, 3)
    fig, axes = _subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    axes = list(axes.flat)
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _figures(paths, manifests, out) -> dict[str, str]:
    figures = {}
    sparse = _sparse_stages(paths, manifests)
    shown = sparse[:MAX_SERIES]
    split = _common_split(shown)
    if shown:
        layers = [l["name"] for l in manifests[shown[0]]["results"]["sparsity"]["layers"]]
        fig, ax = _subplots(figsize=(7, 3.6))
        width = 0.8 / len(shown)
        for i, path in enumerate(shown):
            kept = {l["name"]: 100 * l["kept_fraction"]
                    for l in manifests[path]["results"]["sparsity"]["layers"]}
            ax.bar(np.arange(len(layers)) + (i - (len(shown) - 1) / 2) * width,
                   [kept.get(name, np.nan) for name in layers], width,
                   label=_chain_label(path, manifests), color=_COLORS[i])
        ax.set_xticks(range(len(layers)), layers)
        ax.set_ylabel("weights kept (%)")
        ax.set_title("Kept weights per layer")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        figures["kept_per_layer"] = _save(fig, out, "kept_per_layer.png")

        pixel_panels = _first_layer_pixels(shown, manifests)
        if pixel_panels:
            fig, axes = _subplots(1, len(pixel_panels), figsize=(2.3 * len(pixel_panels), 2.6),
                                     squeeze=False)
            for ax, (label, image) in zip(axes[0], pixel_panels):
                shown_image = ax.imshow(image, cmap="magma", vmin=0)
                ax.set_title(label, fontsize=7)
                ax.axis("off")
                fig.colorbar(shown_image, ax=ax, fraction=0.046, pad=0.04)
            fig.suptitle("Weights still reading each input pixel (first layer)", fontsize=9)
            figures["first_layer_pixels"] = _save(fig, out, "first_layer_pixels.png")

        fig, ax = _subplots(figsize=(6, 4))
        points = []
        for i, path in enumerate(shown):
            accuracy, _ = _accuracy(path, manifests[path], split)
            kept = 100 * manifests[path]["results"]["kept_fraction"]
            if accuracy is None:
                continue
            marker = "o" if manifests[path]["stage"] != "finetune" else "s"
            ax.scatter([kept], [accuracy], color=_COLORS[i], marker=marker, s=50, zorder=4,
                       label=_chain_label(path, manifests))
            points.append((kept, accuracy))
        dense = _dense_accuracies(paths, manifests, split)
        for j, (name, accuracy) in enumerate(dense.items()):
            # Stages of several chains: each chain's own first stage, by its folder's name.
            label = "dense" if len(dense) == 1 else f"dense `{name}`"
            ax.axhline(accuracy, color="gray", lw=1, ls=("--", ":", "-.")[j % 3], label=label)
            points.append((100.0, accuracy))
        spec = manifests[shown[0]]["model"]["spec"]
        for label, (error, compression) in PUBLISHED.get(spec, {}).items():
            ax.scatter([100 / compression], [100 - error], marker="*", color="black", s=60,
                       zorder=3)
            ax.annotate(label, (100 / compression, 100 - error), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
            points.append((100 / compression, 100 - error))
        if points:
            kept_values, accuracies = zip(*points)
            ax.set_xscale("log")
            ax.set_xlim(min(kept_values) / 1.5, min(100, max(kept_values)) * 1.5)
            low, high = min(accuracies), max(accuracies)
            pad = max(0.1, 0.15 * (high - low))
            ax.set_ylim(low - pad, high + pad)
        ax.set_xlabel("weights kept (%)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"Accuracy ({split}) vs kept weights (published points: test error)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
        figures["accuracy_vs_kept"] = _save(fig, out, "accuracy_vs_kept.png")

    trimmed = [p for p in paths if manifests[p]["stage"] in ("nettrim", "oneshot")]
    if trimmed:  # one panel per stage, three to a row: every stage given is shown
        fig, axes = _grid(len(trimmed))
        for ax, path in zip(axes, trimmed):
            layers = manifests[path]["results"]["layers"]
            names = list(layers)
            # A one-shot peer certifies nothing: its bars are only what was measured.
            series = ([("certified ε", [certified_epsilon(layers[n]) for n in names])]
                      if manifests[path]["stage"] == "nettrim" else []) + [
                ("measured, calibration", [layers[n].get("measured", np.nan) for n in names]),
                ("measured, held-out", [layers[n].get("heldout_measured", np.nan)
                                        for n in names])]
            width = 0.8 / len(series)
            for i, (label, values) in enumerate(series):
                ax.bar(np.arange(len(names)) + (i - (len(series) - 1) / 2) * width,
                       [np.nan if v is None else v for v in values], width, label=label,
                       color=_COLORS[i])
            ax.set_xticks(range(len(names)), names, fontsize=7)
            ax.set_ylabel("relative discrepancy")
            ax.set_title(stage_label(manifests[path]), fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("Per layer: certified ε (Net-Trim) and measured discrepancy", fontsize=10)
        figures["nettrim_certificates"] = _save(fig, out, "nettrim_certificates.png")

    searched = [p for p in trimmed if manifests[p]["stage"] == "nettrim"]
    if searched:
        fig, axes = _grid(len(searched))
        for ax, path in zip(axes, searched):
            layers = manifests[path]["results"]["layers"]
            for i, name in enumerate(list(layers)[:MAX_SERIES]):
                steps = layers[name].get("lam_path") or []
                if not steps:
                    continue
                ax.plot([s["lam"] for s in steps], [s["discrepancy"] for s in steps], "o-",
                        color=_COLORS[i], label=name, ms=4)
                ax.scatter([steps[0]["lam"]], [steps[0]["discrepancy"]], color=_COLORS[i],
                           marker="x", s=40)
                ax.axhline(certified_epsilon(layers[name]), color=_COLORS[i], lw=0.6, ls=":")
            ax.set_xscale("log")
            ax.set_xlabel("λ (normalized problem)")
            ax.set_ylabel("discrepancy of the solve")
            ax.set_title(stage_label(manifests[path]), fontsize=9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        fig.suptitle("Net-Trim λ search per layer (x: first solve; dotted: ε)", fontsize=10)
        figures["lambda_path"] = _save(fig, out, "lambda_path.png")
    return figures


def _save(fig, out, name) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    return name


def _dense_accuracies(paths, manifests, split) -> dict[str, float]:
    """{folder name: accuracy %} of the first stages (dense models) among ``paths``."""
    found = {}
    for path in paths:
        if manifests[path]["stage"] in ("train", "import"):
            accuracy, _ = _accuracy(path, manifests[path], split)
            if accuracy is not None:
                found[path.name] = accuracy
    return found


def _first_layer_pixels(paths, manifests):
    panels = []
    for path in paths:
        manifest = manifests[path]
        shape = manifest.get("input_shape")
        first = manifest["results"]["sparsity"]["layers"][0]
        if not shape or len(first["shape"]) != 2 or first["shape"][0] != math.prod(shape):
            continue
        params = load(path).params
        kernel = _find_kernel(params, first["name"])
        counts = np.count_nonzero(np.asarray(kernel), axis=1).reshape(shape)
        panels.append((_chain_label(path, manifests) + f"\n{int(np.sum(counts.sum(-1) > 0))} "
                       f"of {math.prod(shape[:-1])} pixels read", counts.sum(-1)))
    return panels


def _find_kernel(params, name):
    node = params
    for key in name.split("/"):
        node = node[key]
    return node["kernel"]


_SERIES_FIGURES = ("kept_per_layer", "first_layer_pixels", "accuracy_vs_kept")


def _markdown(paths, manifests, figures) -> str:
    sparse = _sparse_stages(paths, manifests)
    lines = ["# hoyertrim report", "",
             "| directory | stage | method | accuracy % | kept % | compression | alive units | "
             "bytes on disk |", "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        manifest = manifests[path]
        results = manifest.get("results", {})
        accuracy, split = _accuracy(path, manifest)
        kept = results.get("kept_fraction")
        size = results.get("bytes_on_disk")
        if size is None and (path / "network").is_dir():
            size = directory_bytes(path / "network")
        lines.append(
            f"| `{path.name}` | {manifest['stage']} | {_chain_label(path, manifests)} | "
            + (f"{accuracy:.2f} ({split})" if accuracy is not None else "–") + " | "
            + (f"{100 * kept:.2f}" if kept is not None else "–") + " | "
            + (f"{results['compression']:.1f}x" if "compression" in results else "–") + " | "
            + str(results.get("architecture", "–")) + " | "
            + (f"{size:,}" if size is not None else "–") + " |")
    lines.append("")
    lines.append("Accuracy is on the test set where `hoyertrim evaluate` was run on the stage, "
                 "else on the validation split.")
    for path in paths:
        manifest = manifests[path]
        if manifest["stage"] not in ("nettrim", "oneshot"):
            continue
        results = manifest["results"]
        lines += ["", f"## {stage_label(manifest)} (`{path.name}`)", "",
                  "| layer | program | kept % | certified ε | measured (calibration) | "
                  "measured (held-out) | λ | solves | converged (duality gap) | note |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, layer in results["layers"].items():
            gap = layer.get("duality_gap")
            lines.append(
                f"| {name} | {layer['program']} | {100 * layer['kept_fraction']:.2f} | "
                f"{certified_epsilon(layer):.4f} | {_number(layer.get('measured'))} | "
                f"{_number(layer.get('heldout_measured'))} | {_number(layer.get('lam'), '.3g')} | "
                f"{layer.get('solves', 0)} | {layer.get('converged')} "
                f"({'–' if gap is None else f'{100 * gap:.1f}%'}) | "
                f"{layer.get('fallback') or layer.get('reason', '')} |")
        held = results.get("heldout") or {}
        if held:
            lines.append("")
            lines.append(f"Held-out: top-1 agreement {100 * held['top1_agreement']:.2f}%, "
                         f"logits relative error {held['logits_relative_error']:.4f}.")
    for key, title in (("kept_per_layer", "Kept weights per layer"),
                       ("first_layer_pixels", "Pixels the first layer reads"),
                       ("accuracy_vs_kept", "Accuracy vs kept weights"),
                       ("nettrim_certificates", "Net-Trim: certified vs measured"),
                       ("lambda_path", "Net-Trim λ search")):
        if key in figures:
            lines += ["", f"## {title}", "", f"![{title}]({figures[key]})"]
            if key in _SERIES_FIGURES and len(sparse) > MAX_SERIES:
                rest = ", ".join(f"`{p.name}`" for p in sparse[MAX_SERIES:])
                lines += ["", f"(The first {MAX_SERIES} of {len(sparse)} stages; {rest} are in "
                          "the table above.)"]
    return "\n".join(lines) + "\n"


def _number(value, spec=".4f") -> str:
    return "–" if value is None else format(value, spec)
