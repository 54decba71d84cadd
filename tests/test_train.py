import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax
import pytest

from helpers import small_mlp, synthetic
from hoyertrim.checkpoint import Checkpointer, CheckpointMismatchError
from hoyertrim.models import create_model
from hoyertrim.train import (create_train_state, cross_entropy, distillation_loss, fit,
                             frozen_teacher, make_evaluate, make_optimizer, make_train_epoch,
                             make_train_step)


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_fit_learns_mnist_and_logs(small_mnist, tmp_path):
    model = create_model("lenet300100")
    state, history = fit(model, optax.adam(1e-3), small_mnist, epochs=3, batch_size=100,
                         metrics_log=tmp_path / "m.jsonl", progress=False)
    assert history[-1]["val_accuracy"] > 0.9
    assert int(state.step) == 3 * 40 and int(state.epoch) == 3
    lines = [json.loads(l) for l in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3]


def test_training_is_deterministic_for_a_seed(small_mnist):
    model = create_model("lenet300100", dropout_rate=0.2)
    runs = [fit(model, optax.adam(1e-3), small_mnist, epochs=1, batch_size=200, seed=3,
                progress=False)[0] for _ in range(2)]
    assert _leaves_equal(runs[0].params, runs[1].params)
    other = fit(model, optax.adam(1e-3), small_mnist, epochs=1, batch_size=200, seed=4,
                progress=False)[0]
    assert not _leaves_equal(runs[0].params, other.params)


class _Killed(Exception):
    pass


def test_killed_and_resumed_run_is_bit_identical(small_mnist, tmp_path):
    model = create_model("lenet300100", dropout_rate=0.1)
    tx = make_optimizer("adam", 1e-3, total_steps=4 * 40)
    reference, _ = fit(model, tx, small_mnist, epochs=4, batch_size=100, seed=7, progress=False,
                       checkpointer=Checkpointer(tmp_path / "reference"))

    def crash_after_second_epoch(epoch, metrics):
        if epoch == 2:
            raise _Killed

    log = tmp_path / "metrics.jsonl"
    with pytest.raises(_Killed):
        fit(model, tx, small_mnist, epochs=4, batch_size=100, seed=7, progress=False,
            checkpointer=Checkpointer(tmp_path / "run"), on_epoch_end=crash_after_second_epoch,
            metrics_log=log)
    with open(log, "a") as handle:  # a kill in the middle of writing a line
        handle.write('{"epoch": 3, "train_lo')
    # A new process would only have the directory: start from a fresh Checkpointer and seed.
    # Saves are asynchronous, so the kill may lose the second epoch's checkpoint (as a real one
    # can); resuming from either must reproduce the uninterrupted run.
    resumed_checkpointer = Checkpointer(tmp_path / "run")
    last_saved = resumed_checkpointer.latest_step()
    assert last_saved in (1, 2)
    resumed, history = fit(model, tx, small_mnist, epochs=4, batch_size=100, seed=7,
                           progress=False, checkpointer=resumed_checkpointer, metrics_log=log)
    assert [h["epoch"] for h in history] == list(range(last_saved + 1, 5))
    # Each epoch logged once: the lost epoch's line and the torn line are gone.
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert _leaves_equal(reference.params, resumed.params)
    assert _leaves_equal(reference.opt_state, resumed.opt_state)
    assert int(resumed.step) == int(reference.step)


@pytest.mark.slow  # seconds, not milliseconds: keeps the quick tier under 90 s
def test_checkpoint_restores_types_masks_config_and_keeps_latest_plus_best(tmp_path):
    from hoyertrim.masks import magnitude_masks
    from hoyertrim.transforms import masked_fine_tuning, masks_in_state
    model = create_model("lenet300100")
    params = create_train_state(model, optax.adam(1e-3), jax.random.PRNGKey(0),
                                (28, 28, 1)).params
    masks = magnitude_masks(params, 0.5)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     masked_fine_tuning(optax.adam(1e-3), masks))
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (28, 28, 1), params=params)
    checkpointer = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    for step, acc in [(1, 0.5), (2, 0.9), (3, 0.6), (4, 0.7)]:
        checkpointer.save(step, state.replace(step=jnp.int32(step)), config={"lr": 1e-3},
                          metrics={"val_accuracy": acc})
    checkpointer.wait_until_finished()
    assert checkpointer.all_steps() == [2, 3, 4]  # last two + the best (step 2)
    assert checkpointer.best_step() == 2
    # The template's masks only give the structure: the saved masks come back.
    template_tx = optax.chain(optax.clip_by_global_norm(1.0),
                              masked_fine_tuning(optax.adam(1e-3),
                                                 jax.tree.map(jnp.ones_like, masks)))
    template = create_train_state(model, template_tx, jax.random.PRNGKey(1), (28, 28, 1))
    restored, config = Checkpointer(tmp_path / "ckpt").restore(template, 2)
    assert config == {"lr": 1e-3} and int(restored.step) == 2
    inner = restored.opt_state[1].inner_state[0]
    assert type(inner) is type(state.opt_state[1].inner_state[0])  # ScaleByAdamState
    assert _leaves_equal(restored.params, state.params)
    assert _leaves_equal(masks_in_state(restored.opt_state), masks)


def test_restore_into_other_structure_names_mismatched_leaves(tmp_path):
    tx = optax.adam(1e-3)
    small = create_train_state(create_model("lenet300100"), tx, jax.random.PRNGKey(0), (28, 28, 1))
    checkpointer = Checkpointer(tmp_path / "ckpt")
    checkpointer.save(1, small)
    other = create_train_state(create_model("nettrim_fc"), tx, jax.random.PRNGKey(0), (28, 28, 1))
    with pytest.raises(CheckpointMismatchError) as err:
        checkpointer.restore(other)
    message = str(err.value)
    assert "params/dense3/kernel" in message          # only in the target
    assert "params/dense1/kernel: saved (300, 100), target (300, 1000)" in message
    with pytest.raises(FileNotFoundError, match="No checkpoint at step 9"):
        checkpointer.restore(small, 9)


def test_train_step_accepts_any_transformation_and_uses_params():
    model = create_model("lenet300100")
    # Pure weight decay with a zero learning-rate optimizer: only the params-dependent term acts.
    tx = optax.chain(optax.add_decayed_weights(1.0), optax.sgd(0.5))
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (28, 28, 1))
    x, y = jnp.zeros((4, 28, 28, 1)), jnp.zeros((4,), jnp.int32)
    new_state, metrics = jax.jit(make_train_step(model, tx))(state, x, y)
    kernel, new_kernel = state.params["dense0"]["kernel"], new_state.params["dense0"]["kernel"]
    # Zero input: the first layer's kernel gradient is 0, so only decay moves it: w - 0.5 w.
    np.testing.assert_allclose(new_kernel, 0.5 * kernel, rtol=1e-6)
    assert int(new_state.step) == 1 and np.isfinite(metrics["loss"])


@pytest.mark.slow
def test_batchnorm_model_trains_and_evaluates():
    model = create_model("resnet20")
    tx = optax.sgd(0.1, momentum=0.9)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (32, 32, 3))
    x = jax.random.uniform(jax.random.PRNGKey(1), (16, 32, 32, 3))
    y = jnp.arange(16) % 10
    new_state, _ = make_train_epoch(model, tx, batch_size=8)(state, x, y)
    assert not _leaves_equal(state.model_state, new_state.model_state)
    metrics = make_evaluate(model, batch_size=5)(new_state.params, new_state.model_state, x, y)
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_evaluate_counts_every_example_once():
    model = create_model("lenet300100")
    state = create_train_state(model, optax.sgd(0.1), jax.random.PRNGKey(0), (28, 28, 1))
    x = jax.random.uniform(jax.random.PRNGKey(1), (7, 28, 28, 1))
    logits = model.apply({"params": state.params}, x)
    labels = jnp.argmax(logits, -1).at[:3].set((jnp.argmax(logits[:3], -1) + 1) % 10)
    metrics = make_evaluate(model, batch_size=3)(state.params, {}, x, labels)
    assert float(metrics["accuracy"]) == pytest.approx(4 / 7)


def test_optimizer_errors():
    with pytest.raises(ValueError, match="total_steps"):
        make_optimizer("adam", schedule="cosine")
    with pytest.raises(ValueError, match="Unknown optimizer"):
        make_optimizer("lion", schedule="constant")


@pytest.mark.slow  # seconds, not milliseconds: keeps the quick tier under 90 s
def test_distillation_loss_reduces_to_its_parts():
    logits = jax.random.normal(jax.random.PRNGKey(0), (8, 10))
    teacher = jax.random.normal(jax.random.PRNGKey(1), (8, 10))
    labels = jnp.arange(8) % 10
    np.testing.assert_allclose(distillation_loss(logits, labels, teacher, label_weight=1.0),
                               cross_entropy(logits, labels), rtol=1e-6)
    soft = distillation_loss(logits, labels, teacher, temperature=3.0, label_weight=0.0)
    expected = 9.0 * optax.softmax_cross_entropy(logits / 3.0,
                                                 jax.nn.softmax(teacher / 3.0)).mean()
    np.testing.assert_allclose(soft, expected, rtol=1e-6)
    # The soft term alone is minimized by copying the teacher: zero gradient there.
    grad = jax.grad(lambda z: distillation_loss(z, labels, teacher, label_weight=0.0))(teacher)
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)


@pytest.mark.slow
def test_train_step_with_teacher_fits_the_teacher_not_the_labels():
    model = create_model("lenet300100")
    tx = optax.sgd(0.1)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (28, 28, 1))
    x = jax.random.uniform(jax.random.PRNGKey(1), (16, 28, 28, 1))
    y = jnp.arange(16) % 10
    soft_only = functools.partial(distillation_loss, label_weight=0.0)
    # A student identical to its teacher has nothing to learn from it, whatever the labels say.
    same = frozen_teacher(model, state.params)
    new_state, metrics = jax.jit(make_train_step(model, tx, soft_only, same))(state, x, y)
    for before, after in zip(jax.tree.leaves(state.params), jax.tree.leaves(new_state.params)):
        np.testing.assert_allclose(after, before, atol=1e-6)
    # A different teacher moves the student towards it.
    other = create_train_state(model, tx, jax.random.PRNGKey(7), (28, 28, 1)).params
    teacher = frozen_teacher(model, other)
    step = jax.jit(make_train_step(model, tx, soft_only, teacher))

    def divergence(params):  # T²·KL(teacher ‖ student): the soft loss minus its minimum
        target = teacher(x)
        return float(soft_only(model.apply({"params": params}, x), y, target)
                     - soft_only(target, y, target))

    before = divergence(state.params)
    for _ in range(10):
        state, metrics = step(state, x, y)
    assert divergence(state.params) < 0.5 * before


def test_fit_distills_with_the_default_loss(small_mnist):
    model = create_model("lenet300100")
    teacher_state, _ = fit(model, optax.adam(1e-3), small_mnist, epochs=2, batch_size=100,
                           progress=False)
    teacher = frozen_teacher(model, teacher_state.params)
    state, history = fit(model, optax.adam(1e-3), small_mnist, epochs=2, batch_size=100,
                         seed=1, teacher=teacher, progress=False)
    assert history[-1]["val_accuracy"] > 0.85
    # The logged loss is distillation_loss's, not plain cross-entropy's.
    x, y = small_mnist.train.images[:500], small_mnist.train.labels[:500]
    logits = model.apply({"params": state.params}, x)
    assert abs(history[-1]["train_loss"] - float(distillation_loss(logits, y, teacher(x)))) < \
        abs(history[-1]["train_loss"] - float(cross_entropy(logits, y)))


@pytest.mark.slow
def test_masked_fine_tune_resumes_bit_identically_with_its_masks(tmp_path):
    """The masks travel in the optimizer state: a resumed fine-tune needs only a template of
    the same structure (here all-True masks) and continues exactly as the uninterrupted one."""
    from hoyertrim.masks import magnitude_masks
    from hoyertrim.transforms import masked_fine_tuning, masks_in_state

    model, dataset = small_mlp(), synthetic(2000)
    dense, _ = fit(model, optax.adam(1e-3), dataset, epochs=1, batch_size=64, progress=False)
    masks = magnitude_masks(dense.params, 0.8)

    def run(directory, epochs, tx_masks):
        tx = masked_fine_tuning(optax.adam(1e-3), tx_masks)
        state = create_train_state(model, tx, jax.random.PRNGKey(0), (8, 8, 1),
                                   params=dense.params)
        return fit(model, tx, dataset, epochs=epochs, batch_size=64, state=state,
                   progress=False, checkpointer=Checkpointer(directory))[0]

    reference = run(tmp_path / "reference", 4, masks)
    run(tmp_path / "run", 2, masks)  # stops after 2 epochs, as if killed
    resumed = run(tmp_path / "run", 4, jax.tree.map(jnp.ones_like, masks))
    assert _leaves_equal(resumed.params, reference.params)
    assert _leaves_equal(masks_in_state(resumed.opt_state), masks)
    for p, m in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(masks)):
        assert not np.any(np.asarray(p)[~np.asarray(m)])


@pytest.mark.slow  # seconds, not milliseconds: keeps the quick tier under 90 s
def test_load_needs_no_template(tmp_path):
    import hoyertrim
    model, dataset = small_mlp(), synthetic(1000)
    tx = make_optimizer("adam", 1e-3, total_steps=64)  # a schedule the loader never needs
    state, _ = fit(model, tx, dataset, epochs=2, batch_size=32, progress=False,
                   config={"lr": 1e-3}, checkpointer=Checkpointer(tmp_path / "run" / "checkpoints"))
    loaded = hoyertrim.load(tmp_path / "run")
    assert loaded.config == {"lr": 1e-3} and loaded.step in (1, 2)
    if loaded.step == 2:
        assert _leaves_equal(loaded.params, state.params)
    assert jax.tree.structure(loaded.masks) == jax.tree.structure(state.params)
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        hoyertrim.load(tmp_path / "nothing")
    # Loading changes nothing in the run (it may be read-only or someone else's), not even a
    # damaged step, which training would set aside.
    other = ({1, 2} - {loaded.step}).pop()
    (tmp_path / "run" / "checkpoints" / str(other) / "_CHECKPOINT_METADATA").write_text("")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    assert hoyertrim.load(tmp_path / "run").step == loaded.step
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before


@pytest.mark.slow  # seconds: keeps the quick tier under 90 s
def test_evaluate_counts_every_position_of_per_position_labels_once():
    import optax as _optax
    from hoyertrim.models import create_model
    from hoyertrim.train import make_evaluate
    model = create_model("gpt", dim=16, heads=2, mlp=32, depth=1, context=8)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (5, 8), 0, 256).astype(jnp.uint8)
    labels = jax.random.randint(jax.random.PRNGKey(1), (5, 8), 0, 256)
    variables = model.init(jax.random.PRNGKey(2), tokens)
    logits = model.apply(variables, tokens)
    expected_loss = _optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    expected_accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    got = make_evaluate(model, batch_size=2)(variables["params"], {}, tokens, labels)  # padded
    assert float(got["loss"]) == pytest.approx(float(expected_loss), rel=1e-5)
    assert float(got["accuracy"]) == pytest.approx(float(expected_accuracy), abs=1e-7)


def test_a_sequential_model_trains_and_predicts_without_a_train_argument():
    import flax.linen as nn

    from hoyertrim.train import mode_kwargs, predict_accuracy
    model = nn.Sequential([lambda x: x.reshape((x.shape[0], -1)), nn.Dense(8), nn.relu,
                           nn.Dense(10)])
    assert mode_kwargs(model, True) == {}  # its **kwargs go to the first layer, a Dense
    state = create_train_state(model, optax.sgd(0.1), jax.random.PRNGKey(0), (4, 4, 1))
    images, labels = np.ones((6, 4, 4, 1), np.float32), np.arange(6) % 10
    accuracy = predict_accuracy(model, state.params, state.model_state, images, labels)
    logits = model.apply({"params": state.params}, images)
    assert accuracy == pytest.approx(float(np.mean(np.argmax(logits, -1) == labels)))


class _SmallConvNet(nn.Module):
    """nn.Conv with BatchNorm and a stride: the operations whose gradient XLA:CPU runs slowly
    inside a loop body, so `make_train_epoch` dispatches its steps from the host."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        # No bias before BatchNorm: its gradient is 0 up to rounding, which Adam would amplify
        # into steps of size lr that differ between two programs.
        x = nn.Conv(4, (3, 3), strides=2, use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def test_host_loop_epoch_is_the_scanned_epoch():
    model = _SmallConvNet()
    tx = optax.adam(1e-2)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (8, 8, 1))
    x = jax.random.uniform(jax.random.PRNGKey(1), (20, 8, 8, 1))
    y = jnp.arange(20) % 10
    runs = {loop: make_train_epoch(model, tx, batch_size=6, loop=loop)(state, x, y)
            for loop in ("scan", "host", "auto")}
    scan_state, scan_metrics = runs["scan"]
    assert not _leaves_equal(state.params, scan_state.params)
    for loop in ("host", "auto"):
        loop_state, loop_metrics = runs[loop]
        # The same 3 steps on the same batches; XLA may fuse the two programs differently.
        for a, b in zip(jax.tree.leaves(scan_state), jax.tree.leaves(loop_state)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        for key in scan_metrics:
            np.testing.assert_allclose(scan_metrics[key], loop_metrics[key], rtol=1e-5)
        assert int(loop_state.epoch) == 1 and int(loop_state.step) == 3


def test_auto_loop_dispatches_from_the_host_only_for_weight_convolutions(monkeypatch):
    # The scanned epoch calls lax.scan when it is traced; the host loop never does.
    x, y = jnp.zeros((8, 28, 28, 1)), jnp.zeros((8,), jnp.int32)
    for model, host in ((_SmallConvNet(), True), (create_model("lenet5"), False),
                        (create_model("lenet300100"), False)):
        tx = optax.sgd(0.1)
        state = create_train_state(model, tx, jax.random.PRNGKey(0), (28, 28, 1))
        calls = []
        original = jax.lax.scan
        monkeypatch.setattr(jax.lax, "scan", lambda *a, **k: calls.append(1) or original(*a, **k))
        make_train_epoch(model, tx, batch_size=4)(state, x, y)
        monkeypatch.setattr(jax.lax, "scan", original)
        assert (not calls) is host, type(model).__name__
    with pytest.raises(ValueError, match="loop must be"):
        make_train_epoch(create_model("lenet5"), optax.sgd(0.1), 8, loop="while")
