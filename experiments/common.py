"""Helpers shared by the experiment scripts (argument parsing, result files). Not library code."""

from __future__ import annotations

import argparse
import json
import os
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
    parser.add_argument("--workdir", default=None,
                        help="where checkpoints, logs and results go (default: runs/<name>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def workdir(args: argparse.Namespace, default_name: str) -> pathlib.Path:
    path = pathlib.Path(args.workdir or os.path.join("runs", default_name)).absolute()
    path.mkdir(parents=True, exist_ok=True)
    return path


def environment() -> dict:
    import jax
    return {"python": platform.python_version(), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "argv": sys.argv}


def write_json(path: pathlib.Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}")
