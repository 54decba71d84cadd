"""Training: a pure jitted `train_step`, whole epochs as one `lax.scan`, evaluation, and `fit`.

Any optax `GradientTransformation` drives the update; it is called as
``tx.update(grads, opt_state, params)`` so transforms that need the parameters (the DeepHoyer
penalty transforms, the mask transform) can be chained in front of the optimizer.

Determinism: the epoch-``e`` shuffle uses ``fold_in(state.key, e)`` and the dropout key of step
``t`` is ``fold_in(state.key, t)``; both come from the state, so a run resumed from a checkpoint
reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from hoyertrim.data import Dataset
from hoyertrim.inspection.linear_maps import locate
from hoyertrim.inspection.program import Program


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or inf."""


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries between steps (a pytree of arrays).

    Attributes:
      step: optimizer steps taken, int32 scalar.
      epoch: completed epochs, int32 scalar.
      params: the model's ``params`` collection.
      model_state: the other variable collections (e.g. ``{"batch_stats": ...}``), ``{}`` if none.
      opt_state: the optax state of ``tx``.
      key: the run's base PRNG key (raw uint32[2]); never consumed, only folded.
    """

    step: jax.Array
    epoch: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    key: jax.Array


def mode_kwargs(model: nn.Module, train: bool) -> dict:
    """``{"train": train}`` when the model's ``__call__`` takes a ``train`` argument, else ``{}``:
    a user's model without one (no dropout, no BatchNorm) is trained and evaluated as it is.
    ``**kwargs`` counts as taking it, except on an ``nn.Sequential``, which hands its keywords
    to its first layer (a Dense would refuse ``train``)."""
    try:
        parameters = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return {"train": train}
    forwards = any(p.kind is p.VAR_KEYWORD for p in parameters.values()) and \
        not isinstance(model, nn.Sequential)
    takes = "train" in parameters or forwards
    return {"train": train} if takes else {}


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       input_shape: tuple[int, ...], params: Any = None,
                       model_state: Any = None, input_dtype=jnp.float32) -> TrainState:
    """Initializes a model and optimizer.

    Args:
      model: a Flax module called as ``model.apply(variables, images[, train=...])``.
      tx: the optax transformation used for training.
      key: a raw PRNG key (``jax.random.PRNGKey``); split into init and run keys.
      input_shape: per-example image shape (H, W, C).
      params / model_state: start from these instead of a fresh init (e.g. a pretrained model).
      input_dtype: the inputs' dtype (``Dataset.input_dtype``: uint8 bytes for a text corpus).
    """
    init_key, run_key = jax.random.split(key)
    variables = model.init(init_key, jnp.zeros((1, *input_shape), input_dtype),
                           **mode_kwargs(model, False))
    variables = flax.core.unfreeze(variables)
    fresh_params = variables.pop("params")
    params = fresh_params if params is None else params
    model_state = variables if model_state is None else model_state
    return TrainState(step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32),
                      params=params, model_state=model_state, opt_state=tx.init(params),
                      key=run_key)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of logits (batch, [positions,] classes) against int labels
    (batch, [positions])."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def distillation_loss(logits: jax.Array, labels: jax.Array, teacher_logits: jax.Array, *,
                      temperature: float = 4.0, label_weight: float = 0.5) -> jax.Array:
    """Knowledge distillation (Hinton et al., 2015) mixed with the label cross-entropy.

    ``label_weight · CE(logits, labels) + (1 − label_weight) · T² · CE(softmax(teacher/T),
    softmax(logits/T))``, averaged over the batch. The T² keeps the soft term's gradient scale
    independent of the temperature T. Used to fine-tune a pruned network towards its dense
    original: the soft targets carry what the dense model knows about every example, which a
    sparse network that can reach 100% training accuracy would otherwise overfit away.

    Args:
      logits, teacher_logits: (batch, classes).
      labels: int (batch,).
      temperature: T > 0.
      label_weight: weight in [0, 1] of the hard-label term.
    """
    soft_targets = jax.nn.softmax(teacher_logits / temperature)
    soft = optax.softmax_cross_entropy(logits / temperature, soft_targets).mean()
    return (label_weight * cross_entropy(logits, labels)
            + (1.0 - label_weight) * temperature ** 2 * soft)


def frozen_teacher(model: nn.Module, params, model_state: Mapping | None = None
                   ) -> Callable[[jax.Array], jax.Array]:
    """``images -> logits`` of a fixed trained model in evaluation mode (no dropout, BatchNorm
    running statistics): the ``teacher`` argument of `fit` / `make_train_step`."""
    variables = {"params": params, **(model_state or {})}
    kwargs = mode_kwargs(model, False)

    def teacher(images: jax.Array) -> jax.Array:
        return model.apply(variables, images, **kwargs)

    return teacher


def _default_loss(loss_fn, teacher):
    if loss_fn is None:
        return cross_entropy if teacher is None else distillation_loss
    return loss_fn


def _forward(model, params, model_state, images, train, dropout_key):
    variables = {"params": params, **model_state}
    kwargs = mode_kwargs(model, train)
    if train and model_state:
        logits, new_state = model.apply(variables, images, **kwargs,
                                        mutable=list(model_state), rngs={"dropout": dropout_key})
        return logits, flax.core.unfreeze(new_state)
    rngs = {"dropout": dropout_key} if dropout_key is not None else None
    return model.apply(variables, images, **kwargs, rngs=rngs), model_state


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    loss_fn: Callable[..., jax.Array] | None = None,
                    teacher: Callable[[jax.Array], jax.Array] | None = None):
    """Returns the pure function ``train_step(state, images, labels) -> (state, metrics)``.

    Args:
      model, tx: the Flax model and the optax transformation.
      loss_fn: ``loss_fn(logits, labels)`` without a teacher (default `cross_entropy`),
        ``loss_fn(logits, labels, teacher_logits)`` with one (default `distillation_loss`).
      teacher: optional ``teacher(images) -> logits`` (e.g. the dense model before pruning);
        evaluated on every batch, never differentiated.

    ``metrics`` holds the batch ``loss`` and the number of ``correct`` predictions. The returned
    function is not jitted, so it can be scanned; `make_train_epoch` and `fit` jit it.
    """
    loss_fn = _default_loss(loss_fn, teacher)

    def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
        dropout_key = jax.random.fold_in(state.key, state.step)
        targets = (labels,) if teacher is None else (
            labels, jax.lax.stop_gradient(teacher(images)))

        def objective(params):
            logits, new_model_state = _forward(model, params, state.model_state, images, True,
                                               dropout_key)
            return loss_fn(logits, *targets), (logits, new_model_state)

        (loss, (logits, new_model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        new_state = state.replace(step=state.step + 1, params=params,
                                  model_state=new_model_state, opt_state=opt_state)
        return new_state, {"loss": loss, "correct": correct}

    return train_step


def make_train_epoch(model: nn.Module, tx: optax.GradientTransformation, batch_size: int,
                     loss_fn: Callable[..., jax.Array] | None = None,
                     teacher: Callable[[jax.Array], jax.Array] | None = None,
                     mesh: Mesh | None = None, loop: str = "auto", state_sharding=None):
    """Returns ``train_epoch(state, images, labels) -> (state, metrics)``.

    ``loss_fn`` and ``teacher`` are as in `make_train_step`. With a ``mesh`` (one axis,
    ``"data"``; see `data_mesh`) every batch is split along its examples over the mesh's devices
    and the state is replicated: data-parallel training, written as one program that XLA
    partitions (the gradients' sum over the batch becomes an all-reduce). It computes what one
    device computes, up to the order of the reductions. ``state_sharding`` (a pytree of
    shardings shaped like the state, `state_shardings`) keeps the state so laid out after every
    step: the largest params and optimizer leaves split over the mesh (FSDP-style) instead of
    replicated; XLA gathers what each step needs.

    One epoch is ``len(images) // batch_size`` steps over the batches of a fresh permutation
    drawn from ``fold_in(state.key, state.epoch)``; the last partial batch is dropped (a different
    one every epoch). ``images``/``labels`` should already be on the device. ``metrics`` holds the
    mean training ``loss`` and ``accuracy`` over the epoch, and ``first_nonfinite_step``: the
    index within the epoch of the first step whose loss was NaN or inf (-1 if none).

    ``loop`` says how the steps run — the same steps on the same batches either way:
    ``"scan"``: the epoch is one jitted `lax.scan` (no per-step dispatch: fastest for small
    models); ``"host"``: a Python loop calling one jitted step per batch; ``"auto"`` (default):
    ``"host"`` when a convolution of the model has a parameter kernel and the mesh's (or the
    default) devices are CPUs, else ``"scan"``. XLA:CPU runs the gradient's convolutions 10-30x
    slower inside a loop body (jax-ml/jax#12868: the transposed convolutions lose their fast
    channels-last path there), so a scanned ResNet-20 epoch trains at ~10 images/s where the
    same steps dispatched one by one reach ~180 (`benchmarks/train_throughput.py`); a step that
    long hides its dispatch.
    """
    if loop not in ("auto", "scan", "host"):
        raise ValueError(f"loop must be 'auto', 'scan' or 'host', not {loop!r}.")
    train_step = make_train_step(model, tx, loss_fn, teacher)

    def batch_step(state, images, labels, batch_indices):
        batch_images, batch_labels = images[batch_indices], labels[batch_indices]
        if mesh is not None:
            batch_images, batch_labels = (jax.lax.with_sharding_constraint(
                a, NamedSharding(mesh, PartitionSpec("data"))) for a in (batch_images,
                                                                        batch_labels))
        state, metrics = train_step(state, batch_images, batch_labels)
        if state_sharding is not None:
            state = jax.lax.with_sharding_constraint(state, state_sharding)
        return state, metrics

    def batch_order(state, num_examples):
        num_batches = num_examples // batch_size
        if num_batches == 0:
            raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} examples.")
        shuffle_key = jax.random.fold_in(jax.random.fold_in(state.key, 0x5EED), state.epoch)
        order = jax.random.permutation(shuffle_key, num_examples)
        return order[: num_batches * batch_size].reshape(num_batches, batch_size)

    def summary(state, losses, corrects, labels):
        bad = ~jnp.isfinite(losses)
        return state.replace(epoch=state.epoch + 1), {
            "loss": losses.mean(),
            "accuracy": corrects.sum() / (losses.shape[0] * batch_size
                                          * math.prod(labels.shape[1:])),
            "first_nonfinite_step": jnp.where(jnp.any(bad), jnp.argmax(bad), -1)}

    @jax.jit
    def scan_epoch(state: TrainState, images: jax.Array, labels: jax.Array):
        order = batch_order(state, images.shape[0])
        state, metrics = jax.lax.scan(
            lambda state, batch_indices: batch_step(state, images, labels, batch_indices),
            state, order)
        return summary(state, metrics["loss"], metrics["correct"], labels)

    jit_order = jax.jit(batch_order, static_argnums=1)
    jit_step = jax.jit(lambda state, images, labels, order, i: batch_step(
        state, images, labels, order[i]))
    jit_summary = jax.jit(summary)

    def host_epoch(state: TrainState, images: jax.Array, labels: jax.Array):
        order = jit_order(state, images.shape[0])
        losses, corrects = [], []
        for i in range(order.shape[0]):
            state, metrics = jit_step(state, images, labels, order, i)
            losses.append(metrics["loss"])
            corrects.append(metrics["correct"])
        return jit_summary(state, jnp.stack(losses), jnp.stack(corrects), labels)

    chosen = {"scan": scan_epoch, "host": host_epoch}

    def train_epoch(state: TrainState, images: jax.Array, labels: jax.Array):
        if loop not in chosen:  # "auto", decided once from the step's own computation
            devices = mesh.devices.flat if mesh is not None else jax.devices()[:1]
            on_cpu = all(d.platform == "cpu" for d in devices)
            sample = jax.ShapeDtypeStruct((1, *images.shape[1:]), images.dtype)
            chosen[loop] = chosen["host" if on_cpu and _has_weight_convolution(
                model, state, sample) else "scan"]
        return chosen[loop](state, images, labels)

    return train_epoch


def _has_weight_convolution(model, state: TrainState, images) -> bool:
    """Whether a convolution of the model takes a parameter as its kernel (a conv written as
    patches and a matmul, like the zoo's `PatchConv`, does not: its gradient is matmuls)."""
    closed = jax.make_jaxpr(lambda params, x: _forward(
        model, params, state.model_state, x, False, None)[0])(state.params, images)
    located, _ = locate(Program(closed), len(jax.tree.leaves(state.params)))
    return any(where.op.name == "conv_general_dilated" for where in located.values())


def data_mesh(batch_size: int, devices=None) -> Mesh | None:
    """A one-axis ``("data",)`` mesh over ``devices`` (default: every device of every process —
    after `jax.distributed.initialize`, the whole cluster) for data-parallel training, or None
    when there is one device or the batch does not split evenly over them (then training runs
    on one device)."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < 2 or batch_size % len(devices):
        return None
    return Mesh(np.array(devices), ("data",))


def _replicated(tree, mesh: Mesh):
    """``tree`` on every device of ``mesh`` (also those of other processes, which hold the same
    values)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return _placed(tree, jax.tree.map(lambda _: sharding, tree))


# Leaves smaller than this stay replicated under ``shard_params``: gathering them would cost
# more than storing them (64 KiB of float32).
SHARD_MIN_ELEMENTS = 1 << 14


def state_shardings(state: TrainState, mesh: Mesh, shard_params: bool = True,
                    min_elements: int | None = None):
    """Shardings of a `TrainState` over a one-axis data mesh: everything replicated, except —
    with ``shard_params`` — every params and optimizer-state leaf of at least ``min_elements``
    entries (default `SHARD_MIN_ELEMENTS`), split over the mesh along its largest axis that the
    device count divides (the optimizer's moments mirror the params, so each is split like its
    parameter)."""
    min_elements = SHARD_MIN_ELEMENTS if min_elements is None else min_elements
    devices = mesh.devices.size
    axis_name = mesh.axis_names[0]

    def spec(leaf):
        shape = np.shape(leaf)
        if not shard_params or math.prod(shape) < min_elements:
            return NamedSharding(mesh, PartitionSpec())
        axes = [a for a in np.argsort(shape)[::-1] if shape[a] % devices == 0]
        if not axes:
            return NamedSharding(mesh, PartitionSpec())
        parts = [None] * len(shape)
        parts[int(axes[0])] = axis_name
        return NamedSharding(mesh, PartitionSpec(*parts))

    replicated = NamedSharding(mesh, PartitionSpec())
    return state.replace(
        step=replicated, epoch=replicated, key=replicated,
        params=jax.tree.map(spec, state.params),
        model_state=jax.tree.map(lambda _: replicated, state.model_state),
        opt_state=jax.tree.map(spec, state.opt_state))


def _placed(tree, shardings):
    """``tree``'s leaves laid out by ``shardings`` (also across processes, whose hosts hold the
    same values)."""
    def put(leaf, sharding):
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree, shardings)


def make_evaluate(model: nn.Module, batch_size: int = 1000):
    """Returns jitted ``evaluate(params, model_state, images, labels) -> {"loss", "accuracy"}``.

    Runs the model in inference mode over all examples (the last batch is padded and masked, so
    every example counts exactly once); ``loss`` is the mean cross-entropy, ``accuracy`` the
    top-1 accuracy, both per position for per-position labels (a language model's next bytes:
    perplexity = exp(loss), bits per byte = loss / ln 2).
    """

    @jax.jit
    def evaluate(params, model_state, images, labels):
        num_examples = images.shape[0]
        num_batches = -(-num_examples // batch_size)
        pad = num_batches * batch_size - num_examples
        images = jnp.pad(images, [(0, pad)] + [(0, 0)] * (images.ndim - 1))
        labels = jnp.pad(labels, [(0, pad)] + [(0, 0)] * (labels.ndim - 1))
        valid = jnp.arange(num_batches * batch_size) < num_examples
        per_example = math.prod(labels.shape[1:])  # positions per example (1 for a class)
        batches = (images.reshape(num_batches, batch_size, *images.shape[1:]),
                   labels.reshape(num_batches, batch_size, *labels.shape[1:]),
                   valid.reshape(num_batches, batch_size))

        def body(carry, batch):
            x, y, mask = batch
            logits, _ = _forward(model, params, model_state, x, False, None)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            mask = mask.reshape(mask.shape + (1,) * (y.ndim - 1))
            correct = (jnp.argmax(logits, -1) == y) & mask
            return carry, (jnp.sum(losses * mask), jnp.sum(correct))

        _, (losses, correct) = jax.lax.scan(body, None, batches)
        count = num_examples * per_example
        return {"loss": losses.sum() / count, "accuracy": correct.sum() / count}

    return evaluate


def state_to_tree(state: TrainState) -> dict:
    """The checkpointable dict view of a `TrainState`."""
    return {"step": state.step, "epoch": state.epoch, "params": state.params,
            "model_state": state.model_state, "opt_state": state.opt_state, "key": state.key}


def tree_to_state(tree: Mapping) -> TrainState:
    return TrainState(**tree)


def fit(model: nn.Module, tx: optax.GradientTransformation, dataset: Dataset, *,
        epochs: int, batch_size: int = 128, seed: int = 0, state: TrainState | None = None,
        checkpointer=None, config: Mapping | None = None,
        metrics_log: str | os.PathLike | None = None, progress: bool = True,
        on_epoch_end: Callable[[int, dict], None] | None = None,
        loss_fn: Callable[..., jax.Array] | None = None,
        teacher: Callable[[jax.Array], jax.Array] | None = None,
        devices: Sequence[jax.Device] | None = None,
        shard_params: bool = False) -> tuple[TrainState, list[dict]]:
    """Trains for ``epochs`` epochs, evaluating on the validation split after each.

    Args:
      model, tx: the Flax model and the optax transformation.
      dataset: a `hoyertrim.data.Dataset`.
      epochs: total epochs of the run (a resumed run continues up to this number).
      batch_size: examples per step.
      seed: seeds initialization and the data order when ``state`` is not given.
      state: start from this state (e.g. a pretrained model with a fresh ``tx``).
      checkpointer: a `hoyertrim.checkpoint.Checkpointer`; if it holds a checkpoint the run
        resumes from its latest one, and a checkpoint is written after every epoch.
      config: JSON-serializable run configuration stored with each checkpoint.
      metrics_log: path of a JSONL file; one line of metrics is appended per epoch (lines of
        epochs after the one the run starts from — an interrupted run's — are dropped first,
        so a resumed run logs each epoch once).
      progress: show a progress bar with loss and accuracy.
      on_epoch_end: called as ``on_epoch_end(epoch, metrics)`` after each epoch is saved.
      loss_fn, teacher: the training loss and an optional distillation teacher, as in
        `make_train_step` (``train_loss`` in the metrics is this loss).
      devices: the devices to train on, data-parallel (`data_mesh`; default: every device —
        of every process after `jax.distributed.initialize` — when the batch splits evenly over
        them; ``jax.local_devices()[:1]`` for one).
      shard_params: with several devices, split the largest params and optimizer-state leaves
        over them instead of replicating them (`state_shardings`): for a model whose state does
        not fit one device. The same results up to the order of the reductions; nothing
        changes on one device.

    Returns:
      The final state and the list of per-epoch metric dicts of this call.

    Raises:
      TrainingDivergedError: the loss became NaN or inf; the epoch is not saved, so the last
        checkpoint is the last good state.
      OSError: the checkpoint directory cannot be written or lacks the space for a checkpoint
        (checked before any training).
    """
    if state is None:
        state = create_train_state(model, tx, jax.random.PRNGKey(seed), dataset.image_shape,
                                   input_dtype=dataset.input_dtype)
    if checkpointer is not None:
        checkpointer.check_space(2 * sum(np.asarray(leaf).nbytes
                                         for leaf in jax.tree.leaves(state_to_tree(state))))
        if checkpointer.latest_step() is not None:
            state, _ = checkpointer.restore_latest(state)
    mesh = data_mesh(batch_size, devices)
    sharding = None if mesh is None else state_shardings(state, mesh, shard_params)
    train_epoch = make_train_epoch(model, tx, batch_size, loss_fn, teacher, mesh=mesh,
                                   state_sharding=sharding if shard_params else None)
    evaluate = make_evaluate(model)
    # With a mesh the data and the state are replicated on its devices (every process holds
    # the same values) — or the state's largest leaves split over them (``shard_params``);
    # each step's batch is split over them inside the epoch's program.
    place = jax.device_put if mesh is None else functools.partial(_replicated, mesh=mesh)
    state = jax.device_put(state) if mesh is None else _placed(state, sharding)
    train_x, train_y = place(dataset.train.images), place(dataset.train.labels)
    val_x, val_y = place(dataset.validation.images), place(dataset.validation.labels)

    history = []
    start_epoch = int(state.epoch)
    if metrics_log is not None:
        _trim_log(metrics_log, start_epoch)
    bar = tqdm(range(start_epoch, epochs), initial=start_epoch, total=epochs, unit="epoch",
               disable=not progress, desc=getattr(model, "name", None) or type(model).__name__)
    for epoch in bar:
        started = time.perf_counter()
        first_step = int(state.step)
        state, train_metrics = train_epoch(state, train_x, train_y)
        bad_step = int(train_metrics["first_nonfinite_step"])
        if bad_step >= 0:
            last = checkpointer.latest_step() if checkpointer is not None else None
            raise TrainingDivergedError(
                f"The training loss became {float(train_metrics['loss'])} at step "
                f"{first_step + bad_step + 1} (epoch {epoch + 1}); training stopped and this "
                "epoch was not saved" + (f" (the last good checkpoint is epoch {last} in "
                                         f"{checkpointer.directory})" if last else "")
                + ". Lower the learning rate or the penalty strength.")
        val_metrics = evaluate(state.params, state.model_state, val_x, val_y)
        metrics = {
            "epoch": epoch + 1, "step": int(state.step),
            "train_loss": float(train_metrics["loss"]),
            "train_accuracy": float(train_metrics["accuracy"]),
            "val_loss": float(val_metrics["loss"]), "val_accuracy": float(val_metrics["accuracy"]),
            "epoch_seconds": time.perf_counter() - started,
        }
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['train_loss']:.4f}",
                        acc=f"{metrics['train_accuracy']:.4f}",
                        val_acc=f"{metrics['val_accuracy']:.4f}")
        if metrics_log is not None:
            with open(metrics_log, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if checkpointer is not None:
            checkpointer.save(epoch + 1, state, config=config or {}, metrics=metrics)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, metrics)
    if checkpointer is not None:
        checkpointer.wait_until_finished()
    return state, history


def _trim_log(path, last_epoch: int) -> None:
    """Keeps the lines of a metrics log up to epoch ``last_epoch`` (replaced atomically)."""
    path = pathlib.Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            epoch = json.loads(line).get("epoch")
        except (ValueError, AttributeError):
            continue  # a line cut short by a kill
        if isinstance(epoch, int) and epoch <= last_epoch:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


def predict_accuracy(model: nn.Module, params, model_state, images: np.ndarray,
                     labels: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``images`` (n, H, W, C), in [0, 1]."""
    return float(make_evaluate(model, batch_size)(params, model_state, images, labels)["accuracy"])


def make_optimizer(name: str = "adam", learning_rate: float = 1e-3, *, total_steps: int | None = None,
                   schedule: str = "cosine", weight_decay: float = 0.0,
                   momentum: float = 0.9) -> optax.GradientTransformation:
    """A standard optimizer for the experiments.

    Args:
      name: ``"adam"``, ``"adamw"`` (decoupled weight decay), ``"sgd"`` or ``"momentum"``.
      learning_rate: peak learning rate.
      total_steps: length of the run in steps, required by ``schedule="cosine"``.
      schedule: ``"cosine"`` (decay to 0 over ``total_steps``) or ``"constant"``.
      weight_decay: L2 coefficient β; added to the gradient (β·w) for every optimizer but adamw.
      momentum: for ``"momentum"``.
    """
    if schedule == "cosine":
        if not total_steps:
            raise ValueError("schedule='cosine' needs total_steps (the run's number of steps).")
        lr = optax.cosine_decay_schedule(learning_rate, total_steps)
    elif schedule == "constant":
        lr = learning_rate
    else:
        raise ValueError(f"Unknown schedule {schedule!r}; choose 'cosine' or 'constant'.")
    optimizers = {
        "adam": lambda: optax.adam(lr),
        "adamw": lambda: optax.adamw(lr, weight_decay=weight_decay),
        "sgd": lambda: optax.sgd(lr),
        "momentum": lambda: optax.sgd(lr, momentum=momentum, nesterov=True),
    }
    if name not in optimizers:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of {', '.join(optimizers)}.")
    if weight_decay and name != "adamw":
        return optax.chain(optax.add_decayed_weights(weight_decay), optimizers[name]())
    return optimizers[name]()
