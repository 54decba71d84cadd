"""Orbax checkpoints of training runs: state, optimizer state, masks, step, PRNG key and config.

A `Checkpointer` wraps an `orbax.checkpoint.CheckpointManager` that keeps the ``max_to_keep``
latest checkpoints plus the best one by a validation metric. Restores use abstract targets built
from a template state, so optax states come back as their own NamedTuple types; a template of
another structure raises `CheckpointMismatchError` naming the leaves that differ.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from hoyertrim.train import TrainState, state_to_tree, tree_to_state


class CheckpointMismatchError(ValueError):
    """The checkpoint's tree does not match the structure it is restored into."""


def _describe(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _leaf_shapes(tree) -> dict[str, tuple[int, ...] | None]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_describe(p): tuple(getattr(x, "shape", ())) if x is not None else None
            for p, x in leaves}


def _check_structure(saved: Mapping[str, Any], target: Mapping[str, Any], what: str) -> None:
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


class Checkpointer:
    """Saves and restores `TrainState`s of one run directory.

    Args:
      directory: run directory (made absolute, as orbax requires).
      max_to_keep: how many of the latest checkpoints to keep.
      best_metric: metric name used to keep the best checkpoint (higher is better unless
        ``best_mode="min"``); ``None`` keeps only the latest ones.
      best_mode: ``"max"`` or ``"min"``.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2,
                 best_metric: str | None = "val_accuracy", best_mode: str = "max"):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
        self.directory = pathlib.Path(directory).expanduser().absolute()
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
            best_mode=best_mode, keep_checkpoints_without_metrics=True, create=True)
        # Registering the handlers up front lets a fresh manager read metadata of old runs.
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler(),
                    "masks": ocp.StandardCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=handlers)

    def save(self, step: int, state: TrainState, *, config: Mapping | None = None,
             metrics: Mapping[str, float] | None = None, masks: Any = None,
             force: bool = False) -> None:
        """Saves asynchronously; call `wait_until_finished` before reading the files."""
        items = {"state": ocp.args.StandardSave(state_to_tree(state)),
                 "config": ocp.args.JsonSave(dict(config or {}))}
        if masks is not None:
            items["masks"] = ocp.args.StandardSave(masks)
        self._manager.save(step, args=ocp.args.Composite(**items),
                           metrics=dict(metrics) if metrics else None, force=force)

    def restore(self, template: TrainState, step: int | None = None, *,
                masks_template: Any = None) -> tuple[TrainState, dict, Any]:
        """Restores ``(state, config, masks)`` of ``step`` (default: the latest).

        Args:
          template: a state of the same structure (e.g. from `create_train_state`); only its
            shapes, dtypes and types are used.
          step: which checkpoint; `latest_step` if None.
          masks_template: pytree shaped like the saved masks; masks are restored only if given.

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
        _check_structure(metadata["state"], target, "state")
        items = {"state": ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                                target)),
                 "config": ocp.args.JsonRestore()}
        if masks_template is not None:
            if metadata.get("masks") is None:
                raise CheckpointMismatchError(f"Checkpoint at step {step} holds no masks.")
            _check_structure(metadata["masks"], masks_template, "masks")
            items["masks"] = ocp.args.StandardRestore(
                jax.tree.map(ocp.utils.to_shape_dtype_struct, masks_template))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        masks = restored["masks"] if masks_template is not None else None
        return tree_to_state(restored["state"]), dict(restored["config"] or {}), masks

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
