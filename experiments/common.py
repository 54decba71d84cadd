"""Helpers shared by the experiment scripts (argument parsing, result files). Not library code."""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import warnings

# jaxopt is archived; its import-time DeprecationWarning is expected and harmless here.
warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="data root with mnist/, fashion-mnist/, cifar10/ (default: "
                             "$HOYERTRIM_DATA, then the cache, then a download)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def environment() -> dict:
    import jax
    return {"python": platform.python_version(), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "argv": sys.argv}


def write_json(path: pathlib.Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}")


def stage_directory(root, stage: str, model: str, parent, settings: dict) -> pathlib.Path:
    """Where a pipeline stage with these settings and parent goes: the same directory for the
    same (stage, parent, settings) in every script, so they share and resume stages."""
    from hoyertrim import pipeline
    key = {"stage": stage, "parent": None if parent is None else str(parent), **settings}
    return pipeline.default_directory(stage, model, key, root).absolute()


def dense_stage(settings: dict, *, root="runs/pipeline", data_dir=None,
                progress: bool = True) -> pathlib.Path:
    """The dense `train` stage of ``settings`` ({"model", "epochs", ...}) in the directory
    `experiments/run.py` gives the same settings, so every script shares one dense model per
    recipe; trained there if absent, reused if done."""
    from hoyertrim import pipeline
    out = stage_directory(root, "train", settings["model"], None, settings)
    kwargs = pipeline.training_kwargs("train", {k: v for k, v in settings.items()
                                                if k != "model"})
    return pipeline.train(settings["model"], out, data_dir=data_dir, progress=progress,
                          **kwargs).directory


def fill_table(text: str, marker: str, table: str, append: bool = False) -> str:
    """``text`` with ``table`` between its ``<!-- marker table start/end -->`` lines (appended
    at the end first when ``append`` and the page has no such markers)."""
    start, end = f"<!-- {marker} table start -->", f"<!-- {marker} table end -->"
    if append and start not in text:
        text += f"\n{start}\n{end}\n"
    if start not in text or end not in text:
        raise SystemExit(f"The page has no '{start}' … '{end}' markers for the {marker} table.")
    head, rest = text.split(start, 1)
    return head + start + "\n" + table + "\n" + end + rest.split(end, 1)[1]
