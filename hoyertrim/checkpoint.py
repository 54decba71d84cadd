"""Orbax checkpoints of training runs: state, optimizer state (masks included), PRNG key, config.

A `Checkpointer` wraps an `orbax.checkpoint.CheckpointManager` that keeps the ``max_to_keep``
latest checkpoints plus the best one by a validation metric. Restores use abstract targets built
from a template state, so optax states come back as their own NamedTuple types; a template of
another structure raises `CheckpointMismatchError` naming the leaves that differ.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import warnings
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from hoyertrim.nnx_bridge import NnxModel, to_module
from hoyertrim.train import TrainState, mode_kwargs, state_to_tree, tree_to_state


class CheckpointMismatchError(ValueError):
    """The checkpoint's tree does not match the structure it is restored into."""


def _describe(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _leaf_shapes(tree) -> dict[str, tuple[int, ...] | None]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_describe(p): tuple(getattr(x, "shape", ())) if x is not None else None
            for p, x in leaves}


def check_structure(saved: Mapping[str, Any], target: Mapping[str, Any], what: str) -> None:
    saved_shapes, target_shapes = _leaf_shapes(saved), _leaf_shapes(target)
    missing = sorted(set(saved_shapes) - set(target_shapes))
    unexpected = sorted(set(target_shapes) - set(saved_shapes))
    reshaped = sorted(
        f"{k}: saved {saved_shapes[k]}, target {target_shapes[k]}"
        for k in set(saved_shapes) & set(target_shapes)
        if saved_shapes[k] is not None and target_shapes[k] is not None
        and saved_shapes[k] != target_shapes[k]
    )
    if missing or unexpected or reshaped:
        lines = [f"The checkpoint's {what} does not match the structure it is restored into."]
        for label, items in (("in the checkpoint but not in the target", missing),
                             ("in the target but not in the checkpoint", unexpected),
                             ("with different shapes", reshaped)):
            if items:
                shown = "\n    ".join(items[:20]) + (
                    f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
                lines.append(f"  Leaves {label}:\n    {shown}")
        lines.append("Build the target with the same model, optimizer and masks as the saved run.")
        raise CheckpointMismatchError("\n".join(lines))


def _check_writable(directory: pathlib.Path) -> None:
    """Creates ``directory`` and writes a probe file, so a bad workdir fails before training."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise OSError(f"Cannot write checkpoints to {directory}: {error.strerror or error}. "
                      "Choose a writable directory.") from error


def _set_aside_unreadable(directory: pathlib.Path) -> None:
    """Moves step folders whose JSON metadata cannot be parsed (a run killed mid-write, a damaged
    disk) to ``<step>.unreadable``, with a warning: orbax cannot even list a run holding one."""
    for step_dir in sorted(directory.iterdir()):
        if not (step_dir.is_dir() and step_dir.name.isdigit()):
            continue
        for name in ("_CHECKPOINT_METADATA", "metrics/metrics", "config/metadata"):
            path = step_dir / name
            try:
                if path.exists():
                    json.loads(path.read_text())
            except (OSError, ValueError) as error:
                os.replace(step_dir, directory / f"{step_dir.name}.unreadable")
                warnings.warn(f"Checkpoint step {step_dir.name} in {directory} is unreadable "
                              f"({name}: {error}); moved aside as {step_dir.name}.unreadable.",
                              stacklevel=3)
                break


class Checkpointer:
    """Saves and restores `TrainState`s of one run directory.

    Args:
      directory: run directory (made absolute, as orbax requires).
      max_to_keep: how many of the latest checkpoints to keep.
      best_metric: metric name used to keep the best checkpoint (higher is better unless
        ``best_mode="min"``); ``None`` keeps only the latest ones.
      best_mode: ``"max"`` or ``"min"``.
      read_only: only restore: no write-access check, no setting aside of damaged steps, no
        directory created (what `load` uses).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2,
                 best_metric: str | None = "val_accuracy", best_mode: str = "max",
                 read_only: bool = False):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
        self.directory = pathlib.Path(directory).expanduser().absolute()
        if not read_only:  # a reader neither needs write access nor rearranges the run
            _check_writable(self.directory)
            _set_aside_unreadable(self.directory)
        self.best_metric, self.best_mode = best_metric, best_mode
        policies = [checkpoint_managers.LatestN(n=max_to_keep)]
        if best_metric is not None:
            policies.append(checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric],
                reverse=best_mode == "min", n=1))
        # best_fn is what makes orbax write the metrics file next to each checkpoint.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
            best_mode=best_mode, keep_checkpoints_without_metrics=True, create=not read_only,
            read_only=read_only)
        # Registering the handlers up front lets a fresh manager read metadata of old runs.
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=handlers)

    def save(self, step: int, state: TrainState, *, config: Mapping | None = None,
             metrics: Mapping[str, float] | None = None, force: bool = False) -> None:
        """Saves asynchronously; call `wait_until_finished` before reading the files.

        Pruning masks, when training uses `transforms.masked_fine_tuning`, are part of ``state.opt_state``.
        """
        items = {"state": ocp.args.StandardSave(state_to_tree(state)),
                 "config": ocp.args.JsonSave(dict(config or {}))}
        self._manager.save(step, args=ocp.args.Composite(**items),
                           metrics=dict(metrics) if metrics else None, force=force)

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restores ``(state, config)`` of ``step`` (default: the latest).

        Args:
          template: a state of the same structure (e.g. from `create_train_state`); only its
            shapes, dtypes and types are used.
          step: which checkpoint; `latest_step` if None.

        Raises:
          FileNotFoundError: no checkpoint (at that step).
          CheckpointMismatchError: the template's structure differs from the saved tree.
        """
        self.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(
                f"No checkpoint {'' if step is None else f'at step {step} '}in {self.directory}; "
                f"available steps: {list(self.all_steps())}.")
        target = state_to_tree(template)
        metadata = self._manager.item_metadata(step)
        check_structure(metadata["state"], target, "state")
        items = {"state": ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                                target)),
                 "config": ocp.args.JsonRestore()}
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return tree_to_state(restored["state"]), dict(restored["config"] or {})

    def restore_latest(self, template: TrainState) -> tuple[TrainState, dict]:
        """Restores the newest checkpoint that can be read; unreadable newer ones (a run killed
        mid-write, a damaged file) are skipped with a warning that names them.

        Raises:
          CheckpointMismatchError: the template does not match (a user error, not damage).
          ValueError: no checkpoint of this run can be read.
        """
        self.wait_until_finished()
        errors = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                restored = self.restore(template, step)
            except CheckpointMismatchError:
                raise
            except Exception as error:  # orbax raises many types for damaged files
                errors.append(f"step {step}: {type(error).__name__}: {error}")
                continue
            if errors:
                # Moved aside (not deleted): the run re-saves those steps, and a person may
                # still want to look at the damaged files.
                for bad in [s for s in self.all_steps() if s > step]:
                    os.replace(self.directory / str(bad),
                               self.directory / f"{bad}.unreadable")
                self._manager.reload()
                warnings.warn(f"Skipped unreadable checkpoints in {self.directory} "
                              f"({'; '.join(errors)}); resumed from step {step}. The damaged "
                              "steps were moved aside as <step>.unreadable.", stacklevel=2)
            return restored
        raise ValueError(f"No checkpoint in {self.directory} can be read ({'; '.join(errors)}). "
                         "Delete the directory to start the run afresh.")

    def check_space(self, required_bytes: int) -> None:
        """Raises OSError if the checkpoint directory has less than ``required_bytes`` free."""
        free = shutil.disk_usage(self.directory).free
        if free < required_bytes:
            raise OSError(f"{self.directory} has {free:,} bytes free; a checkpoint needs about "
                          f"{required_bytes:,}. Free some space or choose another directory.")

    def config(self, step: int | None = None) -> dict:
        """The run config saved with ``step`` (default: the latest), without restoring arrays."""
        self.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))
        return dict(restored["config"] or {})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the best ``best_metric`` (the latest if none has metrics)."""
        scored = [(self._manager.metrics(s) or {}).get(self.best_metric) for s in self.all_steps()]
        candidates = [(value, s) for value, s in zip(scored, self.all_steps()) if value is not None]
        if not candidates:
            return self.latest_step()
        pick = max if self.best_mode == "max" else min
        return pick(candidates)[1]

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclasses.dataclass
class Loaded:
    """What `load` found: params, the other collections, masks (True = kept), the config and
    which checkpoint it was (``step``; None for a pruned network or a stage's final network).

    Stage directories (the ``hoyertrim`` command's) also give the ``model`` rebuilt from their
    manifest, and a compact stage its ``compact`` model (``params`` and ``masks`` are then None).
    """

    params: Any
    model_state: dict
    masks: Any
    config: dict
    step: int | None
    directory: pathlib.Path
    manifest: dict | None = None
    model: Any = None
    compact: Any = None

    def predict(self, images, *, model=None, batch_size: int = 1000) -> np.ndarray:
        """Logits (n, classes) of ``images`` (n, H, W, C), in inference mode, in batches.

        Args:
          model: the flax module, when the directory does not name one (a training run's
            checkpoints or a `nettrim.save_pruned` directory).
        """
        if self.compact is not None:
            forward = self.compact.apply
        else:
            model = model if model is not None else self.model
            if model is None:
                raise ValueError(f"{self.directory} does not name its model; pass "
                                 "predict(images, model=YourModule()).")
            variables = {"params": self.params, **self.model_state}
            kwargs = mode_kwargs(model, False)
            forward = jax.jit(lambda x: model.apply(variables, x, **kwargs))
        return predict_in_batches(forward, images, batch_size)

    def nnx_module(self):
        """The stage's model as the user's own NNX module, with the stage's params and
        statistics in it (for a model given as an NNX class, ``--model file.py:NnxClass``)."""
        if not isinstance(self.model, NnxModel):
            raise ValueError(f"{self.directory} holds a {type(self.model).__name__}, not an NNX "
                             "model given by its class.")
        if self.params is None:
            raise ValueError(f"{self.directory} is a compact model: use .predict(images), or "
                             "load the stage it was compacted from.")
        return to_module(self.model, {"params": self.params, **self.model_state})


def predict_in_batches(forward, images, batch_size: int = 1000) -> np.ndarray:
    """``forward`` (images (b, ...) → (b, ...)) over ``images`` in batches, as one numpy array."""
    return np.concatenate([np.asarray(forward(images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])


def _restore_on_host(path: pathlib.Path):
    """One saved tree as numpy arrays, read by this process alone: with several processes
    (`jax.distributed`) each reads the file itself — no barrier with the others, and no
    device layout taken from the one process that wrote it."""
    index = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={index},
                                                 barrier_sync_key_prefix=f"process{index}")
    with ocp.StandardCheckpointer(multiprocessing_options=options) as checkpointer:
        metadata = checkpointer.metadata(path)
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        target = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), tree)
        return checkpointer.restore(path, target)


def load(directory: str | os.PathLike, step: int | None = None) -> Loaded:
    """Loads params (and model state, masks, config) from a checkpoint directory, with no
    optimizer or model template.

    Args:
      directory: a training run's checkpoint directory (a `Checkpointer`'s, or a folder holding
        one as ``checkpoints/``), or a pruned network written by `nettrim.save_pruned`.
      step: which checkpoint of a run (default: its best-on-validation one).

    Raises:
      FileNotFoundError: nothing loadable there.
    """
    path = pathlib.Path(directory).expanduser().absolute()
    if (path / "params").is_dir() and (path / "masks").is_dir() and jax.process_count() > 1:
        restored = {name: _restore_on_host(path / name) for name in ("params", "masks", "state")
                    if (path / name).is_dir()}
        return Loaded(restored["params"], dict(restored.get("state") or {}),
                      restored["masks"], {}, None, path)
    if (path / "params").is_dir() and (path / "masks").is_dir():  # nettrim.save_pruned
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            items = dict(params=ocp.args.StandardRestore(), masks=ocp.args.StandardRestore())
            if (path / "state").is_dir():
                items["state"] = ocp.args.StandardRestore()
            restored = checkpointer.restore(path, ocp.args.Composite(**items))
        return Loaded(restored["params"], dict(restored.get("state") or {}),
                      restored["masks"], {}, None, path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not path.is_dir() or not any(p.name.isdigit() for p in path.iterdir()):
        raise FileNotFoundError(f"No checkpoint in {path}: expected a training run's checkpoint "
                                "directory or a pruned network (nettrim.save_pruned).")
    checkpointer = Checkpointer(path, read_only=True)
    step = checkpointer.best_step() if step is None else step
    if step not in checkpointer.all_steps():
        raise FileNotFoundError(f"No checkpoint at step {step} in {path}; available steps: "
                                f"{checkpointer.all_steps()}.")
    restored = checkpointer._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
    checkpointer.close()
    state = restored["state"]
    params = state["params"]
    # Pruned weights are exact zeros (masked training keeps them so): the masks of a run are
    # its params' nonzeros.
    masks = jax.tree.map(lambda p: np.asarray(p) != 0, params)
    return Loaded(params, dict(state.get("model_state") or {}), masks,
                  dict(restored["config"] or {}), step, path)
