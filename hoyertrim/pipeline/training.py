"""Training stages: a dense model (`train`), weights trained elsewhere (`adopt`), DeepHoyer's
regularized training (`regularize`), Zhu & Gupta's gradual magnitude pruning (`gradual`) and the
masked fine-tune (`finetune`)."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.nnx import variablelib

from hoyertrim.checkpoint import CheckpointMismatchError, Checkpointer, check_structure
from hoyertrim.inspection import inspect_model, output_axes, unit_groupings
from hoyertrim.masks import apply_masks, kernel_nonzero_masks
from hoyertrim.nnx_bridge import NnxModel
from hoyertrim.penalties import is_kernel
from hoyertrim.pipeline.directory import (
    MANIFEST, Stage, StageResult, checked_link, new_manifest, stage_result)
from hoyertrim.pipeline.errors import StageError
from hoyertrim.pipeline.modelspec import check_model, model_spec, resolve_model
from hoyertrim.pipeline.network import (
    layer_kernels, load_data, nonzero_counts_like, read_parent, save_network, stage_summary)
from hoyertrim.train import create_train_state, fit, frozen_teacher, make_optimizer, mode_kwargs
from hoyertrim.transforms import (REGULARIZERS, coupled_group_regularization,
                                  gradual_magnitude_pruning, masked_fine_tuning)
from hoyertrim.trees import layer_name


@dataclasses.dataclass(frozen=True)
class Training:
    """The settings every training stage shares (`train`, `regularize`, `gradual`, `finetune`),
    declared once: each stage takes one, the command line builds one from its flags, and
    `training_kwargs` builds one from a flat settings dict (`experiments/run.py`).

    Attributes:
      epochs: passes over the training examples.
      batch_size: examples per step.
      optimizer: ``"adam"``, ``"adamw"``, ``"sgd"`` or ``"momentum"`` (`train.make_optimizer`).
      learning_rate: the peak learning rate.
      schedule: ``"cosine"`` (decay to 0 over the run) or ``"constant"``.
      weight_decay: L2 coefficient added to the gradient.
      seed: seeds initialization, data order and dropout.
      train_examples: train on this many training examples (a fixed random subset; None: all).
      shard_params: with several devices, the largest params and optimizer-state leaves split
        over them (`train.state_shardings`) instead of replicated.
    """

    # The metadata is what the command line shows and checks for each flag (``--batch-size``…).
    epochs: int = dataclasses.field(default=30, metadata={"help": "training epochs",
                                                          "minimum": 1})
    batch_size: int = dataclasses.field(default=128, metadata={"help": "examples per step",
                                                               "minimum": 1})
    optimizer: str = dataclasses.field(default="adam", metadata={
        "help": "optimizer", "choices": ("adam", "adamw", "sgd", "momentum")})
    learning_rate: float = dataclasses.field(default=1e-3, metadata={
        "help": "peak learning rate", "positive": True})
    schedule: str = dataclasses.field(default="cosine", metadata={
        "help": "learning-rate schedule (cosine: decay to 0 over the run)",
        "choices": ("cosine", "constant")})
    weight_decay: float = dataclasses.field(default=0.0, metadata={
        "help": "L2 coefficient added to the gradient", "minimum": 0})
    seed: int = dataclasses.field(default=0, metadata={
        "help": "seeds initialization, data order and dropout"})
    train_examples: int | None = dataclasses.field(default=None, metadata={
        "help": "train on this many training examples (a fixed random subset; default: all)",
        "minimum": 1})
    shard_params: bool = dataclasses.field(default=False, metadata={
        "help": "with several devices, split the largest params and optimizer-state arrays "
                "over them instead of replicating them (FSDP-style)"})

    def config(self, select: str) -> dict:
        """The manifest's record of these settings and the epoch ``select``ed (``"best"`` on
        validation or ``"last"``); StageError for an impossible setting."""
        if self.epochs < 1 or self.batch_size < 1:
            raise StageError(f"epochs and batch size must be >= 1 (got {self.epochs}, "
                             f"{self.batch_size}).")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise StageError(f"The learning rate must be a finite number > 0, got "
                             f"{self.learning_rate}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise StageError(f"The weight decay must be a finite number >= 0, got "
                             f"{self.weight_decay}.")
        if self.train_examples is not None and self.train_examples < 1:
            raise StageError(f"train_examples must be >= 1, got {self.train_examples}.")
        if select not in ("best", "last"):
            raise StageError(f"select must be 'best' or 'last', got {select!r}.")
        config = dataclasses.asdict(self)
        # Absent at their defaults: the records of stages written before they existed match.
        if self.train_examples is None:
            del config["train_examples"]
        if not self.shard_params:
            del config["shard_params"]
        return {**config, "select": select}


# Each training stage's defaults (a fine-tune is shorter and gentler than training).
TRAINING_DEFAULTS = {"train": Training(), "regularize": Training(), "gradual": Training(),
                     "finetune": Training(epochs=20, learning_rate=3e-4)}


def training_kwargs(stage: str, settings: Mapping) -> dict:
    """A stage's keyword arguments from one flat settings dict: the `Training` fields gathered
    into ``training=`` (over the stage's defaults), the rest as they are."""
    if stage not in TRAINING_DEFAULTS:
        return dict(settings)
    names = {field.name for field in dataclasses.fields(Training)}
    training = dataclasses.replace(TRAINING_DEFAULTS[stage],
                                   **{k: v for k, v in settings.items() if k in names})
    return {**{k: v for k, v in settings.items() if k not in names}, "training": training}


def _fit_stage(stage: Stage, model, tx, dataset, params, model_state, config, *, masks=None,
               teacher=None, progress=True) -> None:
    """Trains into ``stage.out/checkpoints`` (resuming), then writes the selected epoch's network
    (with ``masks``, by default its nonzero kernel entries) and finishes the stage."""
    state = create_train_state(model, tx, jax.random.PRNGKey(config["seed"]), dataset.image_shape,
                               input_dtype=dataset.input_dtype,
                               params=params, model_state=model_state)
    started = time.perf_counter()
    with Checkpointer(stage.out / "checkpoints") as checkpointer:
        _, history = fit(model, tx, dataset, epochs=config["epochs"],
                         batch_size=config["batch_size"], state=state, checkpointer=checkpointer,
                         config=config, teacher=teacher, metrics_log=stage.out / "metrics.jsonl",
                         progress=progress, shard_params=config.get("shard_params", False))
        step = checkpointer.best_step() if config["select"] == "best" else \
            checkpointer.latest_step()
        selected, _ = checkpointer.restore(state, step)
    seconds = time.perf_counter() - started
    masks = kernel_nonzero_masks(selected.params) if masks is None else masks
    save_network(stage.out, selected.params, masks, selected.model_state)
    stage.finish(stage_summary(model, selected.params, selected.model_state, dataset,
                          {"epoch": step, "train_seconds": seconds}))


def train(model: str, out, *, model_kwargs: Mapping | None = None, dataset: str = "mnist",
          training: Training = TRAINING_DEFAULTS["train"], data_dir=None,
          progress: bool = True, command=None) -> StageResult:
    """Trains a dense model from scratch; keeps the best-validation epoch.

    Args:
      model: zoo name or ``module:Class`` / ``file.py:Class`` (see `resolve_model`).
      out: the stage directory to write (resumed if it holds this run's checkpoints).
      training: the `Training` settings (``train_examples``: e.g. a part of the
        ``python_stdlib`` corpus's 224k windows).
    """
    record = model_spec(model, model_kwargs)
    module = resolve_model(record["spec"], record["kwargs"], search_path=record.get("search_path"))
    config = training.config("best")
    manifest = new_manifest("train", config, model=record, dataset=dataset, command=command)
    with Stage(out, manifest) as stage:
        if stage.done:
            return stage_result(stage)
        data = load_data(manifest, data_dir).with_train_examples(training.train_examples)
        check_model(module, data, model)
        stage.manifest["input_shape"] = list(data.image_shape)
        tx = _optimizer(config, len(data.train))
        _fit_stage(stage, module, tx, data, None, None, config, progress=progress)
    return stage_result(stage)


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

    A hoyertrim stage directory gives the network it selected (a training stage's best or last
    epoch, as its manifest says), its files checked against their checksums; a training run's
    checkpoint directory gives its newest step.

    The checkpoint may hold the variables dict (``params`` and e.g. ``batch_stats``), a train
    state with a ``params`` entry (and ``batch_stats`` or ``model_state``), or the params alone.

    Raises:
      StageError: unreadable checkpoint, or its tree does not fit the model (the mismatching
        leaves are named).
    """
    path = pathlib.Path(checkpoint).expanduser().absolute()
    if not path.exists():
        raise StageError(f"{checkpoint} does not exist.")
    record = model_spec(model, model_kwargs)
    module = resolve_model(record["spec"], record["kwargs"], search_path=record.get("search_path"))
    try:
        if (path / MANIFEST).is_file():  # a stage directory: the network it selected
            _, _, loaded = read_parent(path)
            tree = {"params": loaded.params, **dict(loaded.model_state or {})}
        else:
            tree = flax.core.unfreeze(_read_tree(path))
    except StageError:
        raise
    except Exception as error:  # orbax and msgpack raise many types for what they cannot read
        raise StageError(f"Cannot read weights from {checkpoint} ({type(error).__name__}: "
                         f"{error}); give an orbax checkpoint directory, a .msgpack or an .npz."
                         ) from error
    if not isinstance(tree, dict):
        raise StageError(f"{checkpoint} holds a {type(tree).__name__}, not a tree of arrays.")
    if isinstance(module, NnxModel) and "params" not in tree:
        tree = _nnx_collections(tree, module)
    if "params" in tree:
        params = tree["params"]
        model_state = dict(tree.get("model_state") or {})
        model_state.update({k: v for k, v in tree.items()
                            if k in ("batch_stats", "cache") and v})
    else:
        params, model_state = tree, {}
    config = {"checkpoint": str(path)}
    manifest = new_manifest("import", config, model=record, dataset=dataset, command=command)
    with Stage(out, manifest) as stage:
        if stage.done:
            return stage_result(stage)
        data = load_data(manifest, data_dir)
        check_model(module, data, model)
        stage.manifest["input_shape"] = list(data.image_shape)
        expected = flax.core.unfreeze(module.init(
            jax.random.PRNGKey(0), jnp.zeros((1, *data.image_shape), data.input_dtype),
            **mode_kwargs(module, False)))
        try:
            check_structure(params, expected.pop("params"), "params")
            check_structure(model_state, expected, "other collections")
        except CheckpointMismatchError as error:
            details = " ".join(str(error).splitlines()[1:-1]).replace("target", "model")
            raise StageError(f"The weights in {checkpoint} do not fit {model}: {details}") \
                from error
        params = jax.tree.map(np.asarray, params)
        save_network(stage.out, params, kernel_nonzero_masks(params), model_state)
        stage.finish(stage_summary(module, params, model_state, data))
    return stage_result(stage)


def _nnx_collections(tree: Mapping, module: NnxModel) -> dict:
    """An NNX module's saved state (``nnx.state(model)`` through orbax: ``{'conv': {'kernel':
    {'value': array}}}``, or plain arrays) as linen collections, each leaf put where the
    module's own variables have it (``params``, ``batch_stats``); RNG state is left out."""
    def strip(node):
        if isinstance(node, Mapping):
            if set(node) == {"value"} and not isinstance(node["value"], Mapping):
                return node["value"]
            return {k: strip(v) for k, v in node.items()}
        return node

    flat = nnx.traversals.flatten_mapping(strip(tree))
    where: dict[tuple, str] = {}
    state = nnx.state(module.build(), nnx.Not(nnx.RngState))
    for path, variable in nnx.to_flat_state(state):
        name = variablelib.variable_name_from_type(type(variable), allow_register=True)
        where[tuple(str(k) for k in path)] = name
    out: dict = {}
    for path, value in flat.items():
        key = tuple(str(k) for k in path)
        if key in where:
            out.setdefault(where[key], {})[key] = value
        elif not (key and key[-1] in ("key", "count")):  # an Rngs stream's state
            out.setdefault("params", {})[key] = value  # reported as unexpected below
    return {name: nnx.traversals.unflatten_mapping(leaves) for name, leaves in out.items()}


def _optimizer(config, num_train):
    if config["batch_size"] > num_train:
        raise StageError(f"The batch size {config['batch_size']} exceeds the {num_train} "
                         f"training examples; give --batch-size {num_train} or less.")
    try:
        return make_optimizer(config["optimizer"], config["learning_rate"],
                              total_steps=config["epochs"] * (num_train // config["batch_size"]),
                              schedule=config["schedule"], weight_decay=config["weight_decay"])
    except ValueError as error:
        raise StageError(str(error)) from error


def _by_known_layer(values: Mapping[str, float], kernels: Mapping) -> Mapping[str, float]:
    """``values`` ({layer: value}), checked to name only layers with a kernel in ``kernels``."""
    unknown = sorted(set(values) - set(kernels))
    if unknown:
        raise StageError(f"No kernel named {', '.join(unknown)}; the layers are "
                         f"{', '.join(sorted(kernels))}.")
    return values


# The penalties over groups of weights: their groups are each layer's units (`unit_groupings`).
GROUP_PENALTIES = ("group_hoyer_square", "group_lasso")


def penalty_gradient(penalty: str, strength: float | Mapping[str, float],
                     groupings: Mapping | None = None) -> optax.GradientTransformation:
    """``REGULARIZERS[penalty]`` at ``strength`` on every Dense/Conv kernel, or at
    ``{layer: α}``: one term per distinct α over the kernels of the layers that have it, so the
    updates gain Σ_layers α_layer ∇R(W_layer) and layers not named gain nothing. ``groupings``
    ({layer: groupings}, a group penalty's only) sets each layer's groups."""
    extra = {"groupings": groupings} if penalty in GROUP_PENALTIES and groupings else {}
    if not isinstance(strength, Mapping):
        return REGULARIZERS[penalty](strength, **extra)

    def kernels_of(layers):
        return lambda path, leaf: is_kernel(path, leaf) and layer_name(path) in layers

    return optax.chain(*(REGULARIZERS[penalty](alpha, where=kernels_of(frozenset(
        name for name, value in strength.items() if value == alpha)), **extra)
        for alpha in sorted(set(strength.values()))))


def regularize(parent, out, *, penalty: str = "hoyer_square",
               strength: float | Mapping[str, float] = 1e-4,
               training: Training = TRAINING_DEFAULTS["regularize"], data_dir=None,
               progress=True, command=None) -> StageResult:
    """Trains from the parent's params with a sparsity penalty (`transforms.REGULARIZERS`)
    chained before the optimizer; keeps the last epoch (sparsity is this stage's point; the
    fine-tune selects on validation).

    Args:
      strength: the penalty's α for every Dense/Conv kernel, or ``{layer: α}`` (layers not
        named are not regularized): the objective is loss + Σ_layers α_layer · R(W_layer), e.g.
        Group-HS stronger on the conv layers, whose units cost the forward FLOPs.
    """
    if penalty not in REGULARIZERS:
        raise StageError(f"Unknown penalty {penalty!r}; choose one of "
                         f"{', '.join(sorted(REGULARIZERS))}.")
    by_layer = isinstance(strength, Mapping)
    values = list(strength.values()) if by_layer else [strength]
    if not values or not all(value > 0 for value in values):
        raise StageError(f"The penalty strength must be > 0, got {strength}.")
    parent_manifest, model, loaded = read_parent(parent)
    if by_layer:
        strength = {name: float(value) for name, value
                    in sorted(_by_known_layer(strength, layer_kernels(loaded.params)).items())}
    config = {"penalty": penalty, "strength": strength, **training.config("last")}
    manifest = new_manifest("regularize", config, parent=parent_manifest, parent_dir=parent,
                         command=command)
    with Stage(out, manifest) as stage:
        if stage.done:
            return stage_result(stage)
        data = load_data(manifest, data_dir).with_train_examples(training.train_examples)
        groupings, coupled = None, []
        if penalty in GROUP_PENALTIES:  # the groups are the units the computation shows
            found = inspect_model(model, {"params": loaded.params, **loaded.model_state},
                                  data.train.images[:1], apply_kwargs=mode_kwargs(model, False))
            groupings = unit_groupings(found.maps)
            if found.coupled and not by_layer:
                # Units of several layers that go only together (a residual stream's channel):
                # one group each, beside every layer's own groups.
                coupled = [coupled_group_regularization(strength, found.coupled,
                                                        output_axes(groupings), penalty)]
        tx = optax.chain(penalty_gradient(penalty, strength, groupings), *coupled,
                         _optimizer(config, len(data.train)))
        _fit_stage(stage, model, tx, data, loaded.params, loaded.model_state, config,
                   progress=progress)
    return stage_result(stage)


def gradual(parent, out, *, sparsity: float | Mapping[str, float] | None = None, like=None,
            end_fraction: float = 0.75, updates_per_epoch: int = 2,
            training: Training = TRAINING_DEFAULTS["gradual"], data_dir=None, progress=True,
            command=None) -> StageResult:
    """Zhu & Gupta's gradual magnitude pruning (`transforms.gradual_magnitude_pruning`) while
    training from the parent's params: every kernel's sparsity rises along the cubic schedule
    from 0 at the first step to its target at ``end_fraction`` of the steps, re-masked
    ``updates_per_epoch`` times an epoch, then training goes on with the masks fixed. The last
    epoch is kept (the masks reach their target only near the end; the fine-tune selects on
    validation).

    Args:
      sparsity: removed fraction of every kernel, or ``{layer: sparsity}`` (layers not named are
        not pruned).
      like: instead of ``sparsity``, a stage directory of the same model whose per-layer counts
        of nonzero kernel weights to reach exactly (e.g. a DeepHoyer-pruned stage, to compare
        the two at the same counts).
    """
    if (sparsity is None) == (like is None):
        raise StageError("Give the target as one of sparsity= (a number or {layer: sparsity}) "
                         "or like= (a stage directory whose per-layer counts to match).")
    if not 0 < end_fraction <= 1 or updates_per_epoch < 1:
        raise StageError(f"end_fraction must be in (0, 1] and updates_per_epoch >= 1 (got "
                         f"{end_fraction}, {updates_per_epoch}).")
    parent_manifest, model, loaded = read_parent(parent)
    kernels = layer_kernels(loaded.params)
    if like is not None:
        like = str(pathlib.Path(like).expanduser().absolute())
        # (removed + ½) / size: `gradual_magnitude_pruning` removes floor(sparsity·size)
        # weights in float32, and the half keeps that floor on the exact count.
        target = {name: (size - kept + 0.5) / size for name, (kept, size)
                  in nonzero_counts_like(kernels, like).items()}
    elif isinstance(sparsity, Mapping):
        target = {name: float(value)
                  for name, value in _by_known_layer(sparsity, kernels).items()}
    else:
        target = {name: float(sparsity) for name in sorted(kernels)}
    if not all(0 <= value < 1 for value in target.values()):
        raise StageError(f"Sparsity must be in [0, 1) for every layer, got {target}.")
    config = {"sparsity": target, "like": like, "end_fraction": end_fraction,
              "updates_per_epoch": updates_per_epoch, **training.config("last")}
    manifest = new_manifest("gradual", config, parent=parent_manifest, parent_dir=parent,
                         command=command)
    with Stage(out, manifest) as stage:
        if stage.done:
            return stage_result(stage)
        data = load_data(manifest, data_dir).with_train_examples(training.train_examples)
        steps_per_epoch = len(data.train) // training.batch_size
        frequency = max(steps_per_epoch // updates_per_epoch, 1)
        # Masks change only on multiples of the frequency: the window ends on one that a step
        # reaches (steps count from 0), so the last update is at the target sparsity.
        last_step = training.epochs * steps_per_epoch - 1
        end_step = frequency * int(min(end_fraction * (last_step + 1), last_step) // frequency)
        if end_step < 1:
            raise StageError(f"{training.epochs} epoch(s) of {steps_per_epoch} steps leave no "
                             "mask update "
                             "after the first; give more epochs or updates_per_epoch.")
        tx = optax.chain(_optimizer(config, len(data.train)), gradual_magnitude_pruning(
            target, begin_step=0, end_step=end_step, frequency=frequency))
        _fit_stage(stage, model, tx, data, loaded.params, loaded.model_state, config,
                   progress=progress)
    return stage_result(stage)


def finetune(parent, out, *, distill: bool = False, teacher=None,
             training: Training = TRAINING_DEFAULTS["finetune"], data_dir=None, progress=True,
             command=None) -> StageResult:
    """Masked fine-tune (`transforms.masked_fine_tuning`: pruned weights stay exactly 0); best
    validation epoch kept.

    Args:
      distill: fine-tune towards a teacher (`train.distillation_loss`) instead of plain
        cross-entropy; ``teacher`` is a stage directory, by default the chain's first stage.
      training: the `Training` settings (default 20 epochs of Adam at 3e-4, cosine).
    """
    parent_manifest, model, loaded = read_parent(parent)
    teacher_dir = None
    if distill:
        teacher_dir = str(pathlib.Path(teacher or checked_link(parent, parent_manifest, "root")
                                       or parent).expanduser().absolute())
    elif teacher is not None:
        raise StageError("A teacher is only used with distillation (--distill).")
    config = {"distill": distill, "teacher": teacher_dir, **training.config("best")}
    manifest = new_manifest("finetune", config, parent=parent_manifest, parent_dir=parent,
                         command=command)
    teacher_fn = None
    if distill:
        teacher_manifest, teacher_model, teacher_loaded = read_parent(teacher_dir)
        teacher_fn = frozen_teacher(teacher_model, teacher_loaded.params,
                                    teacher_loaded.model_state)
    with Stage(out, manifest) as stage:
        if stage.done:
            return stage_result(stage)
        data = load_data(manifest, data_dir).with_train_examples(training.train_examples)
        masks = kernel_nonzero_masks(loaded.params)
        tx = masked_fine_tuning(_optimizer(config, len(data.train)), masks)
        _fit_stage(stage, model, tx, data, apply_masks(loaded.params, masks),
                   loaded.model_state, config, masks=masks, teacher=teacher_fn,
                   progress=progress)
    return stage_result(stage)
