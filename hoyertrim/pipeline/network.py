"""A stage's network: writing it, loading it back (with its model, or as a parent stage), the
kernels it holds and the summary a stage records of it."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from hoyertrim import checkpoint
from hoyertrim import masks as masks_lib
from hoyertrim.compact import load_compact
from hoyertrim.data import load_dataset
from hoyertrim.inspection import inspect_model
from hoyertrim.penalties import is_kernel
from hoyertrim.pipeline.directory import MANIFEST, read_manifest, verify
from hoyertrim.pipeline.errors import StageError
from hoyertrim.pipeline.modelspec import model_of
from hoyertrim.train import make_evaluate, mode_kwargs, predict_accuracy
from hoyertrim.trees import layer_name, path_string

__all__ = ["layer_kernels", "load", "load_data", "nonzero_counts_like", "read_parent",
           "save_network", "stage_sparsity", "stage_summary"]


def save_network(directory: pathlib.Path, params, masks, model_state: Mapping) -> None:
    """The stage's network (host values, the same on every process). With several processes
    every one calls this, as orbax is designed to be called: process 0 writes the files, the
    others wait at its barriers."""
    if jax.process_count() > 1:  # host values: orbax saves them once, not per device
        params, masks, model_state = jax.tree.map(np.asarray, (params, masks, dict(model_state)))
    items = dict(params=ocp.args.StandardSave(params), masks=ocp.args.StandardSave(masks))
    if model_state:
        items["state"] = ocp.args.StandardSave(dict(model_state))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(directory / "network", ocp.args.Composite(**items), force=True)


def load_data(manifest: Mapping, data_dir):
    """The data set a stage's manifest names (`hoyertrim.data.load_dataset`)."""
    return load_dataset(manifest["dataset"], data_dir)


def load(directory, step: int | None = None):
    """Loads any hoyertrim directory with no optimizer or model template.

    A stage directory (any ``hoyertrim`` command's output) comes back with its ``model`` rebuilt
    from the manifest and, for a compact stage, the `compact.CompactModel` (then ``params`` and
    ``masks`` are None); a training run's checkpoint directory or a `nettrim.save_pruned`
    directory comes back as `checkpoint.load` reads it. ``Loaded.apply(images)`` runs it.
    """
    path = pathlib.Path(directory).expanduser().absolute()
    if not (path / MANIFEST).is_file():
        return checkpoint.load(path, step)
    manifest = read_manifest(path)
    if manifest.get("status") != "complete":
        raise StageError(f"{directory} holds an unfinished {manifest['stage']} stage; run its "
                         "command again to finish it.")
    verify(path, manifest)
    model = model_of(manifest)
    if manifest["stage"] == "compact":
        compacted = load_compact(path / "compact", model)
        return checkpoint.Loaded(None, {}, None, manifest["config"], None, path,
                                 manifest=manifest, model=model, compact=compacted)
    loaded = checkpoint.load(path / "network")
    return dataclasses.replace(loaded, config=manifest["config"], directory=path,
                               manifest=manifest, model=model)


def read_parent(directory):
    manifest = read_manifest(directory)
    if manifest.get("status") != "complete":
        raise StageError(f"{directory} holds an unfinished {manifest['stage']} stage; finish it "
                         "first (run its command again).")
    if manifest["stage"] == "compact":
        raise StageError(f"{directory} is a compact model; give the stage before compaction.")
    verify(directory, manifest)
    loaded = checkpoint.load(pathlib.Path(directory).expanduser().absolute() / "network")
    return manifest, model_of(manifest), loaded


def layer_kernels(params) -> dict[str, np.ndarray]:
    """{layer: kernel} of every Dense/Conv kernel (`penalties.is_kernel`)."""
    return {layer_name(path): np.asarray(leaf) for path, leaf
            in jax.tree_util.tree_leaves_with_path(params) if is_kernel(path, leaf)}


def nonzero_counts_like(ours: Mapping[str, np.ndarray], like) -> dict[str, tuple[int, int]]:
    """{layer: (nonzero weights, weights)} of every kernel of the network in stage directory
    ``like``, checked to be the network of ``ours`` ({layer: kernel}): the same layers and
    shapes. What a stage's ``like=`` target reads."""
    theirs = layer_kernels(read_parent(like)[2].params)
    mismatched = sorted(name for name in ours.keys() | theirs.keys()
                        if name not in ours or name not in theirs
                        or ours[name].shape != theirs[name].shape)
    if mismatched:
        raise StageError(f"{like} is not the parent's network: its kernels differ at "
                         f"{', '.join(mismatched)}; give a stage of the same model.")
    return {name: (int(np.count_nonzero(w)), int(w.size)) for name, w in theirs.items()}


def stage_sparsity(model, params, model_state, sample):
    """A stage's `masks.SparsityReport`: every linear map's weights, whatever their names (a
    user's ``x @ w``), and any other leaf named ``kernel``; for a model with neither, every
    matrix-shaped weight."""
    kwargs = mode_kwargs(model, False)
    maps = {m.path for m in inspect_model(model, {"params": params, **model_state}, sample,
                                          apply_kwargs=kwargs).maps}

    def reported(path, leaf):
        return path_string(path) in maps or is_kernel(path, leaf)

    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not any(reported(path, leaf) for path, leaf in leaves):
        def reported(path, leaf):  # no map, no kernel: every matrix-shaped weight
            return np.ndim(leaf) >= 2

    return masks_lib.sparsity_report(params, model, sample=sample, model_state=model_state,
                                     apply_kwargs=kwargs, where=reported)


def stage_summary(model, params, model_state, dataset, extra=None) -> dict:
    report = stage_sparsity(model, params, model_state, dataset.validation.images[:1])
    text = {}
    if dataset.is_text:
        metrics = make_evaluate(model, 256)(params, model_state, dataset.validation.images,
                                            dataset.validation.labels)
        loss = float(metrics["loss"])
        text = {"val_loss": loss, "val_perplexity": float(np.exp(loss)),
                "val_bits_per_byte": loss / float(np.log(2)), "dataset_info": dataset.info}
    return {**text, "val_accuracy": predict_accuracy(model, params, model_state,
                                                     dataset.validation.images,
                                                     dataset.validation.labels),
            "kept_fraction": report.kept_fraction, "compression": report.compression,
            "architecture": report.architecture, "sparsity": report.as_dict(), **(extra or {})}
