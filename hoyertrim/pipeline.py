"""The pruning pipeline as stages over directories: what the ``hoyertrim`` command and the
experiments call.

Each stage reads the directory of the stage before it (none for `train`) and writes a new one:

    hoyertrim.json  the manifest: stage, model (zoo name or ``module:Class`` / ``file.py:Class``
                    and its keyword arguments), dataset, the stage's full config, the parent
                    directory, provenance (command, package versions, time), status, results
    network/        params, masks (True = kept) and the other collections (orbax), for every
                    stage but `compact`
    checkpoints/    the resumable run of a training stage (`checkpoint.Checkpointer`)
    compact/        the compact model (`compact.save_compact`)

A directory is keyed by its manifest's (stage, model, dataset, parent, config): asking for a
finished stage with the same key reuses it, with another key is refused (`StageError`), so a
changed setting never silently reuses a stale result. A stage that fails leaves no directory
behind unless it holds resumable checkpoints.

Stages record validation accuracy; the test set is evaluated by `evaluate`, once per point.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import time
from importlib import metadata
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

MANIFEST = "hoyertrim.json"
FORMAT = 1
PRUNE_RULES = ("threshold", "std", "magnitude", "global_magnitude", "group", "group_std")


class StageError(ValueError):
    """A stage cannot run as asked (bad input, a directory holding another run); the message
    says what to do. The command line prints it as one line."""


# ----------------------------------------------------------------------------------------------
# Models


def resolve_model(spec: str, kwargs: Mapping | None = None, *,
                  search_path: str | None = None) -> nn.Module:
    """The model a spec names.

    Args:
      spec: a zoo name (`models.MODELS`), ``package.module:Name`` (imported; the current
        directory is searched) or ``path/to/file.py:Name``. ``Name`` is a linen Module class or
        a function returning a module.
      kwargs: keyword arguments for it (e.g. ``{"dropout_rate": 0.3}``).
      search_path: a directory to put on ``sys.path`` for the import (the manifest records the
        one the model was first resolved from).

    Raises:
      StageError: the spec does not name a model; says why.
    """
    from hoyertrim import models
    kwargs = dict(kwargs or {})
    if ":" not in spec:
        if spec not in models.MODELS:
            raise StageError(f"Unknown model {spec!r}: give a zoo name ({', '.join(models.MODELS)})"
                             " or your own as package.module:ClassName or file.py:ClassName.")
        return _build(lambda **kw: models.create_model(spec, **kw), kwargs, spec)
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        path = pathlib.Path(where).expanduser()
        if not path.is_file():
            raise StageError(f"Model file {where} does not exist.")
        module_name = f"_hoyertrim_user_{abs(hash(str(path.absolute())))}"
        module = sys.modules.get(module_name)
        if module is None:
            loader = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[module_name] = module
            try:
                loader.loader.exec_module(module)
            except Exception as error:
                del sys.modules[module_name]
                raise StageError(f"Importing {where} failed: {type(error).__name__}: {error}") \
                    from error
    else:
        for directory in (search_path, os.getcwd()):
            if directory and directory not in sys.path:
                sys.path.insert(0, directory)
        try:
            module = importlib.import_module(where)
        except ImportError as error:
            raise StageError(f"Cannot import {where!r} for --model {spec}: {error}. Run from the "
                             "directory that holds it or install it.") from error
    target = getattr(module, name, None)
    if target is None:
        raise StageError(f"{where} has no {name!r} (for --model {spec}).")
    return _build(target, kwargs, spec)


def _build(factory, kwargs, spec) -> nn.Module:
    try:
        model = factory(**kwargs)
    except TypeError as error:
        raise StageError(f"Cannot build {spec} with keyword arguments {kwargs}: {error}") from error
    if not isinstance(model, nn.Module):
        raise StageError(f"{spec} built a {type(model).__name__}, not a flax.linen Module.")
    return model


def model_spec(spec: str, kwargs: Mapping | None = None) -> dict:
    """The manifest's record of a model: file paths made absolute, the import directory kept."""
    where, colon, name = spec.rpartition(":")
    if colon and where.endswith(".py"):
        spec = f"{pathlib.Path(where).expanduser().absolute()}:{name}"
    record = {"spec": spec, "kwargs": dict(kwargs or {})}
    if colon and not where.endswith(".py"):
        record["search_path"] = os.getcwd()
    return record


def model_of(manifest: Mapping) -> nn.Module:
    record = manifest["model"]
    return resolve_model(record["spec"], record.get("kwargs"),
                         search_path=record.get("search_path"))


# ----------------------------------------------------------------------------------------------
# Stage directories


def default_directory(stage: str, model: str, settings: Mapping, root="runs") -> pathlib.Path:
    """``root/<stage>-<model>-<hash of settings>``: where a stage goes when not told, so the same
    settings (which include the parent directory) find the same directory and others another."""
    import hashlib
    digest = hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    short = model.rpartition(":")[2].split("/")[-1].lower() or "model"
    return pathlib.Path(root) / f"{stage}-{short}-{digest.hexdigest()[:8]}"


def read_manifest(directory) -> dict:
    """The manifest of a stage directory.

    Raises:
      StageError: the directory does not exist or is not a stage directory.
    """
    path = pathlib.Path(directory).expanduser().absolute()
    if not path.is_dir():
        raise StageError(f"{directory} does not exist.")
    file = path / MANIFEST
    if not file.is_file():
        raise StageError(f"{directory} is not a hoyertrim stage directory (no {MANIFEST}); "
                         "give one that a hoyertrim command wrote.")
    try:
        manifest = json.loads(file.read_text())
    except ValueError as error:
        raise StageError(f"{file} is damaged ({error}).") from error
    if manifest.get("format") != FORMAT:
        raise StageError(f"{directory} was written in format {manifest.get('format')}; this "
                         f"hoyertrim reads format {FORMAT}.")
    return manifest


def _versions() -> dict:
    names = ("hoyertrim", "jax", "jaxlib", "flax", "optax", "jaxopt", "orbax-checkpoint", "numpy")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return {"python": sys.version.split()[0], **found, "backend": jax.default_backend()}


def _key(manifest: Mapping) -> dict:
    return {k: manifest.get(k) for k in ("stage", "model", "dataset", "parent", "config")}


def _differences(old: Mapping, new: Mapping, prefix="") -> list[str]:
    found = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            found.append(f"{prefix}{k}: {a!r} there, {b!r} asked")
    return found


class _Stage:
    """Opens a stage directory for a manifest: reuses a finished one with the same key, refuses
    one with another, removes what it created if the stage fails before leaving checkpoints."""

    def __init__(self, out, manifest: dict):
        self.out = pathlib.Path(out).expanduser().absolute()
        self.manifest = manifest
        self.done = False
        self.created = False

    def __enter__(self) -> "_Stage":
        file = self.out / MANIFEST
        if file.is_file():
            old = read_manifest(self.out)
            differences = _differences(_key(old), _key(self.manifest))
            if differences:
                raise StageError(f"{self.out} holds another run ({'; '.join(differences[:3])}); "
                                 "choose another --out or delete it.")
            if old.get("status") == "complete":
                self.manifest, self.done = old, True
                return self
        elif self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise StageError(f"{self.out} exists and is not a hoyertrim stage directory; choose "
                             "another --out.")
        self.created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._write({**self.manifest, "status": "running"})
        except OSError as error:
            raise StageError(f"Cannot write to {self.out}: {error.strerror or error}.") from error
        return self

    def _write(self, manifest):
        tmp = self.out / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1, default=_json_default) + "\n")
        os.replace(tmp, self.out / MANIFEST)

    def finish(self, results: Mapping) -> None:
        self.manifest = {**self.manifest, "status": "complete", "results": dict(results)}
        self._write(self.manifest)

    def __exit__(self, kind, error, traceback):
        if kind is None or self.done:
            return False
        resumable = any((self.out / "checkpoints").glob("[0-9]*"))
        if self.created and not resumable:
            shutil.rmtree(self.out, ignore_errors=True)
        elif not resumable and self.created is False and (self.out / MANIFEST).is_file():
            # An existing directory we only added a running manifest to: put it back as empty.
            if not any(p.name != MANIFEST for p in self.out.iterdir()):
                (self.out / MANIFEST).unlink()
        return False


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, pathlib.Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _manifest(stage: str, config: Mapping, *, parent: Mapping | None = None,
              parent_dir=None, model: Mapping | None = None, dataset: str | None = None,
              command: Sequence[str] | None = None) -> dict:
    return {
        "format": FORMAT, "stage": stage,
        "model": model if model is not None else parent["model"],
        "dataset": dataset if dataset is not None else parent["dataset"],
        "input_shape": None if parent is None else parent["input_shape"],
        "parent": None if parent_dir is None else str(pathlib.Path(parent_dir).absolute()),
        "root": None if parent is None else (parent.get("root") or str(
            pathlib.Path(parent_dir).absolute())),
        "config": dict(config),
        "provenance": {"command": list(command) if command is not None else list(sys.argv),
                       "versions": _versions(),
                       "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                           timespec="seconds")},
    }


@dataclasses.dataclass
class StageResult:
    """Where a stage wrote and what it measured (``reused``: an identical finished stage)."""

    directory: pathlib.Path
    stage: str
    results: dict
    reused: bool


def _result(stage: _Stage) -> StageResult:
    return StageResult(stage.out, stage.manifest["stage"], dict(stage.manifest.get("results", {})),
                       stage.done)


def _save_network(directory: pathlib.Path, params, masks, model_state: Mapping) -> None:
    import orbax.checkpoint as ocp
    items = dict(params=ocp.args.StandardSave(params), masks=ocp.args.StandardSave(masks))
    if model_state:
        items["state"] = ocp.args.StandardSave(dict(model_state))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(directory / "network", ocp.args.Composite(**items), force=True)


def _load_data(manifest: Mapping, data_dir):
    from hoyertrim.data import load_dataset
    return load_dataset(manifest["dataset"], data_dir)


# ----------------------------------------------------------------------------------------------
# Loading


def load(directory, step: int | None = None):
    """Loads any hoyertrim directory with no optimizer or model template.

    A stage directory (any ``hoyertrim`` command's output) comes back with its ``model`` rebuilt
    from the manifest and, for a compact stage, the `compact.CompactModel` (then ``params`` and
    ``masks`` are None); a training run's checkpoint directory or a `nettrim.save_pruned`
    directory comes back as `checkpoint.load` reads it. ``Loaded.apply(images)`` runs it.
    """
    from hoyertrim import checkpoint
    path = pathlib.Path(directory).expanduser().absolute()
    if not (path / MANIFEST).is_file():
        return checkpoint.load(path, step)
    manifest = read_manifest(path)
    if manifest.get("status") != "complete":
        raise StageError(f"{directory} holds an unfinished {manifest['stage']} stage; run its "
                         "command again to finish it.")
    model = model_of(manifest)
    if manifest["stage"] == "compact":
        from hoyertrim.compact import load_compact
        compacted = load_compact(path / "compact", model)
        return checkpoint.Loaded(None, {}, None, manifest["config"], None, path,
                                 manifest=manifest, model=model, compact=compacted)
    loaded = checkpoint.load(path / "network")
    return dataclasses.replace(loaded, config=manifest["config"], directory=path,
                               manifest=manifest, model=model)


# ----------------------------------------------------------------------------------------------
# Stages


def _train_config(epochs, batch_size, optimizer, learning_rate, schedule, weight_decay, seed,
                  select):
    if epochs < 1 or batch_size < 1:
        raise StageError(f"epochs and batch size must be >= 1 (got {epochs}, {batch_size}).")
    if learning_rate <= 0:
        raise StageError(f"The learning rate must be > 0, got {learning_rate}.")
    if select not in ("best", "last"):
        raise StageError(f"select must be 'best' or 'last', got {select!r}.")
    return dict(epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                learning_rate=learning_rate, schedule=schedule, weight_decay=weight_decay,
                seed=seed, select=select)


def _fit_stage(stage: _Stage, model, tx, dataset, params, model_state, config, *, teacher=None,
               progress=True):
    """Trains into ``stage.out/checkpoints`` (resuming), returns the selected state."""
    from hoyertrim.checkpoint import Checkpointer
    from hoyertrim.train import create_train_state, fit
    state = create_train_state(model, tx, jax.random.PRNGKey(config["seed"]), dataset.image_shape,
                               params=params, model_state=model_state)
    started = time.perf_counter()
    with Checkpointer(stage.out / "checkpoints") as checkpointer:
        _, history = fit(model, tx, dataset, epochs=config["epochs"],
                         batch_size=config["batch_size"], state=state, checkpointer=checkpointer,
                         config=config, teacher=teacher, metrics_log=stage.out / "metrics.jsonl",
                         progress=progress)
        step = checkpointer.best_step() if config["select"] == "best" else \
            checkpointer.latest_step()
        selected, _ = checkpointer.restore(state, step)
    return selected, step, time.perf_counter() - started


def _summary(model, params, model_state, dataset, extra=None) -> dict:
    from hoyertrim import masks as masks_lib
    from hoyertrim.train import mode_kwargs, predict_accuracy
    report = masks_lib.sparsity_report(params, model, dataset.image_shape,
                                       model_state=model_state,
                                       apply_kwargs=mode_kwargs(model, False))
    return {"val_accuracy": predict_accuracy(model, params, model_state,
                                             dataset.validation.images,
                                             dataset.validation.labels),
            "kept_fraction": report.kept_fraction, "compression": report.compression,
            "architecture": report.architecture, "sparsity": report.as_dict(), **(extra or {})}


def train(model: str, out, *, model_kwargs: Mapping | None = None, dataset: str = "mnist",
          epochs: int = 30, batch_size: int = 128, optimizer: str = "adam",
          learning_rate: float = 1e-3, schedule: str = "cosine", weight_decay: float = 0.0,
          seed: int = 0, data_dir=None, progress: bool = True, command=None) -> StageResult:
    """Trains a dense model from scratch; keeps the best-validation epoch.

    Args:
      model: zoo name or ``module:Class`` / ``file.py:Class`` (see `resolve_model`).
      out: the stage directory to write (resumed if it holds this run's checkpoints).
    """
    record = model_spec(model, model_kwargs)
    module = resolve_model(record["spec"], record["kwargs"], search_path=record.get("search_path"))
    config = _train_config(epochs, batch_size, optimizer, learning_rate, schedule, weight_decay,
                           seed, "best")
    manifest = _manifest("train", config, model=record, dataset=dataset, command=command)
    with _Stage(out, manifest) as stage:
        if stage.done:
            return _result(stage)
        data = _load_data(manifest, data_dir)
        stage.manifest["input_shape"] = list(data.image_shape)
        tx = _optimizer(config, len(data.train))
        state, step, seconds = _fit_stage(stage, module, tx, data, None, None, config,
                                          progress=progress)
        _save_network(stage.out, state.params, _nonzero(state.params), state.model_state)
        stage.finish(_summary(module, state.params, state.model_state, data,
                              {"epoch": step, "train_seconds": seconds}))
    return _result(stage)


def _read_tree(path: pathlib.Path):
    """A pytree from an orbax checkpoint directory (a `Checkpointer` run's newest step, or one
    PyTree/StandardSave item), a flax msgpack file or an .npz of '/'-separated leaf names."""
    if path.is_file() and path.suffix == ".npz":
        tree: dict = {}
        with np.load(path) as arrays:
            for name in arrays.files:
                *keys, leaf = name.split("/")
                node = tree
                for key in keys:
                    node = node.setdefault(key, {})
                node[leaf] = arrays[name]
        return tree
    if path.is_file():
        from flax import serialization
        return serialization.msgpack_restore(path.read_bytes())
    import orbax.checkpoint as ocp
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    steps = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit()), reverse=True)
    if steps:
        path = path / str(steps[0])
        items = [p for p in path.iterdir() if p.is_dir()]
        if len(items) == 1 or (path / "state").is_dir():  # a CheckpointManager step: its item
            path = path / "state" if (path / "state").is_dir() else items[0]
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path)


def adopt(checkpoint, model: str, out, *, model_kwargs: Mapping | None = None,
          dataset: str = "mnist", data_dir=None, command=None) -> StageResult:
    """Makes a model trained elsewhere the first stage of a chain: its weights (an orbax
    checkpoint directory, a flax ``.msgpack`` file of `flax.serialization.to_bytes`, or an
    ``.npz`` with '/'-separated leaf names) are checked against the model's own init and
    written as a stage directory.

    The checkpoint may hold the variables dict (``params`` and e.g. ``batch_stats``), a train
    state with a ``params`` entry (and ``batch_stats`` or ``model_state``), or the params alone.

    Raises:
      StageError: unreadable checkpoint, or its tree does not fit the model (the mismatching
        leaves are named).
    """
    from hoyertrim.checkpoint import CheckpointMismatchError, _check_structure
    from hoyertrim.train import mode_kwargs
    path = pathlib.Path(checkpoint).expanduser().absolute()
    if not path.exists():
        raise StageError(f"{checkpoint} does not exist.")
    record = model_spec(model, model_kwargs)
    module = resolve_model(record["spec"], record["kwargs"], search_path=record.get("search_path"))
    try:
        tree = flax.core.unfreeze(_read_tree(path))
    except Exception as error:  # orbax and msgpack raise many types for what they cannot read
        raise StageError(f"Cannot read weights from {checkpoint} ({type(error).__name__}: "
                         f"{error}); give an orbax checkpoint directory, a .msgpack or an .npz."
                         ) from error
    if not isinstance(tree, dict):
        raise StageError(f"{checkpoint} holds a {type(tree).__name__}, not a tree of arrays.")
    if "params" in tree:
        params = tree["params"]
        model_state = dict(tree.get("model_state") or {})
        model_state.update({k: v for k, v in tree.items()
                            if k in ("batch_stats", "cache") and v})
    else:
        params, model_state = tree, {}
    config = {"checkpoint": str(path)}
    manifest = _manifest("import", config, model=record, dataset=dataset, command=command)
    with _Stage(out, manifest) as stage:
        if stage.done:
            return _result(stage)
        data = _load_data(manifest, data_dir)
        stage.manifest["input_shape"] = list(data.image_shape)
        expected = flax.core.unfreeze(module.init(
            jax.random.PRNGKey(0), jnp.zeros((1, *data.image_shape)), **mode_kwargs(module, False)))
        try:
            _check_structure(params, expected.pop("params"), "params")
            _check_structure(model_state, expected, "other collections")
        except CheckpointMismatchError as error:
            details = " ".join(str(error).splitlines()[1:-1]).replace("target", "model")
            raise StageError(f"The weights in {checkpoint} do not fit {model}: {details}") \
                from error
        params = jax.tree.map(np.asarray, params)
        _save_network(stage.out, params, _nonzero(params), model_state)
        stage.finish(_summary(module, params, model_state, data))
    return _result(stage)


def _optimizer(config, num_train):
    from hoyertrim.train import make_optimizer
    try:
        return make_optimizer(config["optimizer"], config["learning_rate"],
                              total_steps=config["epochs"] * (num_train // config["batch_size"]),
                              schedule=config["schedule"], weight_decay=config["weight_decay"])
    except ValueError as error:
        raise StageError(str(error)) from error


def _nonzero(params):
    """Masks of a network: True where a kernel weight is nonzero (pruned weights are exact
    zeros), everything else kept."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: (np.asarray(p) != 0) if getattr(path[-1], "key", None) == "kernel"
        else np.ones(np.shape(p), bool), params)


def _parent(directory):
    from hoyertrim import checkpoint
    manifest = read_manifest(directory)
    if manifest.get("status") != "complete":
        raise StageError(f"{directory} holds an unfinished {manifest['stage']} stage; finish it "
                         "first (run its command again).")
    if manifest["stage"] == "compact":
        raise StageError(f"{directory} is a compact model; give the stage before compaction.")
    loaded = checkpoint.load(pathlib.Path(directory).expanduser().absolute() / "network")
    return manifest, model_of(manifest), loaded


def regularize(parent, out, *, penalty: str = "hoyer_square", strength: float = 1e-4,
               epochs: int = 30, batch_size: int = 128, optimizer: str = "adam",
               learning_rate: float = 1e-3, schedule: str = "cosine", weight_decay: float = 0.0,
               seed: int = 0, data_dir=None, progress=True, command=None) -> StageResult:
    """Trains from the parent's params with a sparsity penalty (`transforms.REGULARIZERS`)
    chained before the optimizer; keeps the last epoch (sparsity is this stage's point; the
    fine-tune selects on validation)."""
    from hoyertrim.transforms import REGULARIZERS
    if penalty not in REGULARIZERS:
        raise StageError(f"Unknown penalty {penalty!r}; choose one of "
                         f"{', '.join(sorted(REGULARIZERS))}.")
    if strength <= 0:
        raise StageError(f"The penalty strength must be > 0, got {strength}.")
    parent_manifest, model, loaded = _parent(parent)
    config = {"penalty": penalty, "strength": strength, **_train_config(
        epochs, batch_size, optimizer, learning_rate, schedule, weight_decay, seed, "last")}
    manifest = _manifest("regularize", config, parent=parent_manifest, parent_dir=parent,
                         command=command)
    with _Stage(out, manifest) as stage:
        if stage.done:
            return _result(stage)
        data = _load_data(manifest, data_dir)
        tx = optax.chain(REGULARIZERS[penalty](strength), _optimizer(config, len(data.train)))
        state, step, seconds = _fit_stage(stage, model, tx, data, loaded.params,
                                          loaded.model_state, config, progress=progress)
        _save_network(stage.out, state.params, _nonzero(state.params), state.model_state)
        stage.finish(_summary(model, state.params, state.model_state, data,
                              {"epoch": step, "train_seconds": seconds}))
    return _result(stage)


def prune_masks(params, rule: str, value: float):
    """Masks of one pruning rule (`PRUNE_RULES`) at ``value``.

    ``threshold``: |w| < value; ``std``: |w| < value·std(w) per tensor (DeepHoyer's rule);
    ``magnitude`` / ``global_magnitude``: the smallest weights to sparsity ``value`` per layer /
    over all layers; ``group``: whole units with group norm < value·max; ``group_std``: units
    with group norm < value·std of the group norms.
    """
    from hoyertrim import masks as masks_lib
    if rule not in PRUNE_RULES:
        raise StageError(f"Unknown prune rule {rule!r}; choose one of {', '.join(PRUNE_RULES)}.")
    if value < 0 or (rule.endswith("magnitude") and not value < 1):
        raise StageError(f"The {rule} rule needs a value in "
                         f"{'[0, 1)' if rule.endswith('magnitude') else '[0, ∞)'}, got {value}.")
    if rule == "threshold":
        return masks_lib.threshold_masks(params, value)
    if rule == "std":
        return masks_lib.std_threshold_masks(params, value)
    if rule in ("magnitude", "global_magnitude"):
        return masks_lib.magnitude_masks(params, value,
                                         scope="global" if rule == "global_magnitude" else "layer")
    if rule == "group":
        return masks_lib.group_masks(params, fraction_of_max=value)
    return masks_lib.group_masks(params, std_scale=value)


def prune(parent, out, *, rule: str = "std", value: float = 0.1, data_dir=None,
          command=None) -> StageResult:
    """One-shot pruning of the parent's weights by a rule (`prune_masks`); no training."""
    from hoyertrim import masks as masks_lib
    parent_manifest, model, loaded = _parent(parent)
    masks = prune_masks(loaded.params, rule, value)  # checks rule and value before any write
    manifest = _manifest("prune", {"rule": rule, "value": value}, parent=parent_manifest,
                         parent_dir=parent, command=command)
    with _Stage(out, manifest) as stage:
        if stage.done:
            return _result(stage)
        data = _load_data(manifest, data_dir)
        # Kernel masks from the rule, and whatever the parent had pruned stays pruned.
        masks = jax.tree.map(lambda m, old: np.asarray(m) & np.asarray(old), masks,
                             _nonzero(loaded.params))
        params = masks_lib.apply_masks(loaded.params, masks)
        _save_network(stage.out, params, masks, loaded.model_state)
        stage.finish(_summary(model, params, loaded.model_state, data))
    return _result(stage)


def finetune(parent, out, *, epochs: int = 20, learning_rate: float = 3e-4,
             batch_size: int = 128, weight_decay: float = 0.0, distill: bool = False,
             teacher=None, seed: int = 0, data_dir=None, progress=True,
             command=None) -> StageResult:
    """Masked fine-tune (`transforms.masked_fine_tuning`: pruned weights stay exactly 0), Adam
    with a cosine schedule; best validation epoch kept.

    Args:
      distill: fine-tune towards a teacher (`train.distillation_loss`) instead of plain
        cross-entropy; ``teacher`` is a stage directory, by default the chain's first stage.
    """
    from hoyertrim.masks import apply_masks
    from hoyertrim.train import frozen_teacher
    from hoyertrim.transforms import masked_fine_tuning
    parent_manifest, model, loaded = _parent(parent)
    teacher_dir = None
    if distill:
        teacher_dir = str(pathlib.Path(teacher or parent_manifest.get("root") or parent)
                          .expanduser().absolute())
    elif teacher is not None:
        raise StageError("A teacher is only used with distillation (--distill).")
    config = {"distill": distill, "teacher": teacher_dir, **_train_config(
        epochs, batch_size, "adam", learning_rate, "cosine", weight_decay, seed, "best")}
    manifest = _manifest("finetune", config, parent=parent_manifest, parent_dir=parent,
                         command=command)
    teacher_fn = None
    if distill:
        teacher_manifest, teacher_model, teacher_loaded = _parent(teacher_dir)
        teacher_fn = frozen_teacher(teacher_model, teacher_loaded.params,
                                    teacher_loaded.model_state)
    with _Stage(out, manifest) as stage:
        if stage.done:
            return _result(stage)
        data = _load_data(manifest, data_dir)
        masks = _nonzero(loaded.params)
        tx = masked_fine_tuning(_optimizer(config, len(data.train)), masks)
        state, step, seconds = _fit_stage(stage, model, tx, data, apply_masks(loaded.params, masks),
                                          loaded.model_state, config, teacher=teacher_fn,
                                          progress=progress)
        _save_network(stage.out, state.params, masks, state.model_state)
        stage.finish(_summary(model, state.params, state.model_state, data,
                              {"epoch": step, "train_seconds": seconds}))
    return _result(stage)


ONESHOT_METHODS = ("sparsegpt", "wanda", "magnitude")


def nettrim(parent, out, *, epsilon: float | None = None, kept_fraction: float | None = None,
            nm: tuple[int, int] | None = None, method: str = "nettrim",
            within_nonzeros: bool = False, scheme: str = "cascade", samples: int = 5000, heldout: int = 1000,
            maxiter: int = 300, seed: int = 0, data_dir=None, progress=True,
            command=None) -> StageResult:
    """Layer-wise pruning of the parent network from ``samples`` training images, each layer's
    discrepancy checked by a forward pass on them and measured on ``heldout`` validation images.

    Args:
      epsilon / kept_fraction / nm: Net-Trim's ε, or a kept fraction per layer, or an N:M
        pattern (then only the layers whose input count is a multiple of M are pruned).
      method: ``"nettrim"`` (`nettrim.solve_layer`; N:M: `solve_layer_nm`) or a one-shot peer
        (``"sparsegpt"``, ``"wanda"``, ``"magnitude"``: `nettrim.peers`; kept fraction or N:M
        only). A peer's stage is called ``oneshot``.
      within_nonzeros: re-fit each layer on its current nonzeros only (a network pruned
        before, e.g. by DeepHoyer, only gets sparser).
      scheme: ``"parallel"`` or ``"cascade"`` (for the peers: sequential, as their papers run).
    """
    from hoyertrim import nettrim as nettrim_lib
    from hoyertrim.nettrim import peers
    from hoyertrim.train import mode_kwargs
    if method not in ("nettrim", *ONESHOT_METHODS):
        raise StageError(f"Unknown method {method!r}; choose nettrim, "
                         f"{', '.join(ONESHOT_METHODS)}.")
    if sum(v is not None for v in (epsilon, kept_fraction, nm)) != 1:
        raise StageError("Give exactly one of --epsilon, --kept-fraction and --nm.")
    if epsilon is not None and (method != "nettrim" or not 0 < epsilon < 1):
        raise StageError(f"ε must be in (0, 1), got {epsilon}." if method == "nettrim" else
                         f"{method} prunes to a kept fraction or N:M, not to an ε.")
    if kept_fraction is not None and not 0 < kept_fraction <= 1:
        raise StageError(f"The kept fraction must be in (0, 1], got {kept_fraction}.")
    if nm is not None and not (len(nm) == 2 and 0 < nm[0] <= nm[1]):
        raise StageError(f"N:M needs 0 < N ≤ M, got {nm}.")
    if scheme not in ("parallel", "cascade"):
        raise StageError(f"scheme must be 'parallel' or 'cascade', got {scheme!r}.")
    if samples < 1 or heldout < 0 or maxiter < 1:
        raise StageError("samples and maxiter must be >= 1 and heldout >= 0.")
    parent_manifest, model, loaded = _parent(parent)
    config = dict(epsilon=epsilon, kept_fraction=kept_fraction, scheme=scheme, samples=samples,
                  heldout=heldout, maxiter=maxiter, seed=seed)
    if nm is not None:
        config["nm"] = list(nm)
    if method != "nettrim":
        config["method"] = method
    if within_nonzeros:
        config["within_nonzeros"] = True
    stage_name = "nettrim" if method == "nettrim" else "oneshot"
    manifest = _manifest(stage_name, config, parent=parent_manifest, parent_dir=parent,
                         command=command)
    solver = {"nettrim": nettrim_lib.solve_layer_nm if nm else nettrim_lib.solve_layer,
              "sparsegpt": peers.sparsegpt_layer, "wanda": peers.wanda_layer,
              "magnitude": peers.magnitude_layer}[method]
    options, layers = {}, None
    if nm is not None:
        options = {"nm": tuple(nm)}
        kept_fraction = nm[0] / nm[1]
        layers = [name for name, kernel in _kernels(loaded.params).items()
                  if int(np.prod(kernel.shape[:-1])) % nm[1] == 0]
        if not layers:
            raise StageError(f"No layer has an input count that is a multiple of {nm[1]}.")
    if method == "nettrim" and nm is None:
        options["maxiter"] = maxiter
    with _Stage(out, manifest) as stage:
        if stage.done:
            return _result(stage)
        data = _load_data(manifest, data_dir)
        if samples > len(data.train):
            raise StageError(f"--samples {samples} exceeds the {len(data.train)} training images.")
        variables = {"params": loaded.params, **loaded.model_state}
        started = time.perf_counter()
        pruned = nettrim_lib.prune_network(
            model, variables, data.train.images[:samples], epsilon=epsilon,
            kept_fraction=kept_fraction, scheme=scheme, solver=solver, layers=layers,
            heldout=data.validation.images[:heldout] if heldout else 0,
            apply_kwargs=mode_kwargs(model, False), key=jax.random.PRNGKey(seed),
            progress=progress, within_nonzeros=within_nonzeros, **options)
        seconds = time.perf_counter() - started
        _save_network(stage.out, pruned.params, pruned.masks, loaded.model_state)
        layers = {name: {k: v for k, v in layer.items()} for name, layer in pruned.layers.items()}
        stage.finish(_summary(model, pruned.params, loaded.model_state, data, {
            "layers": layers, "heldout": pruned.heldout, "solve_seconds": seconds}))
    return _result(stage)


def _kernels(params, prefix="") -> dict:
    """{layer path: kernel} of a params tree."""
    found = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            if "kernel" in value and not isinstance(value["kernel"], Mapping):
                found[f"{prefix}{key}"] = np.asarray(value["kernel"])
            found.update(_kernels(value, f"{prefix}{key}/"))
    return found


def compact(parent, out, *, data_dir=None, command=None) -> StageResult:
    """Removes dead units (`compact.compact`) and stores the smaller arrays compressed; checks
    that the compact model's logits equal the parent's on the validation images."""
    from hoyertrim import compact as compact_lib
    from hoyertrim.train import mode_kwargs
    parent_manifest, model, loaded = _parent(parent)
    manifest = _manifest("compact", {}, parent=parent_manifest, parent_dir=parent,
                         command=command)
    with _Stage(out, manifest) as stage:
        if stage.done:
            return _result(stage)
        data = _load_data(manifest, data_dir)
        variables = {"params": loaded.params, **loaded.model_state}
        kwargs = mode_kwargs(model, False)
        compacted = compact_lib.compact(model, variables, data.validation.images[:256],
                                        apply_kwargs=kwargs)
        compact_lib.save_compact(stage.out / "compact", compacted)
        reloaded = compact_lib.load_compact(stage.out / "compact", model)
        original = _batched(lambda x: model.apply(variables, x, **kwargs),
                            data.validation.images)
        smaller = _batched(reloaded.apply, data.validation.images)
        scale = float(np.max(np.abs(original)))
        difference = float(np.max(np.abs(original - smaller)))
        if not difference <= 1e-4 * max(scale, 1.0):
            raise StageError(f"The compact model's logits differ from the pruned model's by "
                             f"{difference:.3g} (largest logit {scale:.3g}); not written. "
                             "Please report this with the model.")
        stage.finish({
            "weights_stored": compacted.weights(),
            "weights_nonzero": int(sum(np.count_nonzero(layer.kernel)
                                       for layer in compacted.layers.values())),
            "layers": {name: {"kernel_shape": list(np.shape(layer.kernel)),
                              "inputs_read": None if layer.input_index is None
                              else int(np.size(layer.input_index)),
                              "outputs_kept": int(np.size(layer.output_index))}
                       for name, layer in compacted.layers.items()},
            "bytes_on_disk": directory_bytes(stage.out / "compact"),
            "parent_bytes_on_disk": directory_bytes(pathlib.Path(parent).expanduser().absolute()
                                                    / "network"),
            "max_logit_difference": difference,
            "val_accuracy": float(np.mean(np.argmax(smaller, -1) == data.validation.labels))})
    return _result(stage)


def directory_bytes(path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def _batched(fn, images, batch_size=1000) -> np.ndarray:
    return np.concatenate([np.asarray(fn(images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])


def evaluate(directory, *, reference=None, split: str = "test", data_dir=None) -> dict:
    """Accuracy of a stage on a split; with a reference stage (default: the chain's first
    stage) the top-1 agreement and the logits' relative error ‖f − f_ref‖_F / ‖f_ref‖_F; the
    sparsity report (per-layer kept fraction and FLOPs) and bytes on disk.

    Writes ``evaluation-<split>.json`` into the stage directory and returns it.
    """
    if split not in ("train", "validation", "test"):
        raise StageError(f"split must be train, validation or test, got {split!r}.")
    path = pathlib.Path(directory).expanduser().absolute()
    manifest = read_manifest(path)
    loaded = load(path)
    data = _load_data(manifest, data_dir)
    images, labels = getattr(data, split).images, getattr(data, split).labels
    logits = loaded.predict(images)
    result = {"directory": str(path), "stage": manifest["stage"], "split": split,
              "accuracy": float(np.mean(np.argmax(logits, -1) == labels)),
              "examples": int(len(labels))}
    reference = reference or manifest.get("root")
    if reference:
        reference_loaded = load(reference)
        reference_logits = reference_loaded.predict(images)
        result.update(reference=str(pathlib.Path(reference).absolute()),
                      agreement=float(np.mean(np.argmax(logits, -1)
                                              == np.argmax(reference_logits, -1))),
                      logits_relative_error=float(np.linalg.norm(logits - reference_logits)
                                                  / np.linalg.norm(reference_logits)),
                      reference_accuracy=float(np.mean(np.argmax(reference_logits, -1)
                                                       == labels)))
    if loaded.compact is None:
        from hoyertrim import masks as masks_lib
        from hoyertrim.train import mode_kwargs
        result["sparsity"] = masks_lib.sparsity_report(
            loaded.params, loaded.model, data.image_shape, model_state=loaded.model_state,
            apply_kwargs=mode_kwargs(loaded.model, False)).as_dict()
        result["bytes_on_disk"] = directory_bytes(path / "network")
    else:
        result["weights_stored"] = loaded.compact.weights()
        result["bytes_on_disk"] = directory_bytes(path / "compact")
    (path / f"evaluation-{split}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
