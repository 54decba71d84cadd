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
    kwargs = {k: v for k, v in settings.items() if k != "model"}
    return pipeline.train(settings["model"], out, data_dir=data_dir, progress=progress,
                          **kwargs).directory


def restore_dense(args, model, dataset):
    """Best-validation dense params from train_dense.py's checkpoints (trains them if absent).

    Uses ``args.model``, ``args.dense_workdir`` (default runs/dense_<model>_mnist, where
    README's quick start and train_dense.py put it), ``args.seed`` and ``args.data_dir``. A
    ``--dense-workdir`` without checkpoints is an error; a missing default is trained with
    train_dense.py's defaults, saying so.
    """
    import jax

    import train_dense
    from hoyertrim.checkpoint import Checkpointer
    from hoyertrim.train import create_train_state

    workdir = args.dense_workdir or f"runs/dense_{args.model}_mnist"
    if not any(pathlib.Path(workdir, "checkpoints").glob("[0-9]*")):
        if args.dense_workdir:
            raise SystemExit(f"No dense checkpoint in {workdir}/checkpoints. Train one with: "
                             f"python experiments/train_dense.py --model {args.model} "
                             f"--workdir {workdir}")
        print(f"No dense {args.model} in {workdir}: training one with train_dense.py's "
              "defaults first.", flush=True)
        train_dense.main(["--model", args.model, "--workdir", workdir, "--seed", str(args.seed)]
                         + (["--data-dir", args.data_dir] if args.data_dir else []))
    checkpointer = Checkpointer(f"{workdir}/checkpoints")
    step = checkpointer.best_step()
    config = checkpointer.config(step)
    tx = train_dense.make_tx(config, len(dataset.train) // config["batch_size"])
    template = create_train_state(model, tx, jax.random.PRNGKey(0), dataset.image_shape)
    state, _ = checkpointer.restore(template, step)
    checkpointer.close()
    return state.params


def train_stage(model, tx, dataset, params, epochs, directory, *, batch_size, seed, config=None,
                teacher=None, select_best=True, progress=True):
    """Trains from ``params`` with ``tx`` for ``epochs`` epochs, checkpointing into ``directory``
    (a rerun resumes, or skips a finished stage). Returns the best-validation params, or the last
    ones when ``select_best`` is False."""
    import jax

    from hoyertrim.checkpoint import Checkpointer
    from hoyertrim.train import create_train_state, fit

    state = create_train_state(model, tx, jax.random.PRNGKey(seed), dataset.image_shape,
                               params=params)
    checkpointer = Checkpointer(directory)
    fit(model, tx, dataset, epochs=epochs, batch_size=batch_size, state=state,
        checkpointer=checkpointer, config=config, teacher=teacher,
        metrics_log=f"{directory}/metrics.jsonl", progress=progress)
    step = checkpointer.best_step() if select_best else checkpointer.latest_step()
    best, _ = checkpointer.restore(state, step)
    checkpointer.close()
    return best.params


def masked_finetune(model, dataset, params, masks, directory, *, epochs, learning_rate,
                    batch_size, seed, weight_decay=0.0, teacher=None, config=None, progress=True):
    """Adam with a cosine schedule under `masked_fine_tuning` (pruned weights stay exactly 0),
    optionally distilling from ``teacher``; returns the best-validation params."""
    from hoyertrim.masks import apply_masks
    from hoyertrim.train import make_optimizer
    from hoyertrim.transforms import masked_fine_tuning

    steps = epochs * (len(dataset.train) // batch_size)
    tx = masked_fine_tuning(make_optimizer("adam", learning_rate, total_steps=steps,
                                           weight_decay=weight_decay), masks)
    return train_stage(model, tx, dataset, apply_masks(params, masks), epochs, directory,
                       batch_size=batch_size, seed=seed, config=config,
                       teacher=teacher, progress=progress)


def add_distill_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--distill", action="store_true",
                        help="fine-tune with knowledge distillation from the dense model "
                             "(hoyertrim.train.distillation_loss) instead of plain cross-entropy")
