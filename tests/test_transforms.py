import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hoyertrim import penalties, transforms
from hoyertrim.masks import apply_masks, full_masks, magnitude_masks
from hoyertrim.models import create_model
from hoyertrim.train import create_train_state, cross_entropy, fit, make_train_step


@pytest.mark.parametrize("name", sorted(transforms.REGULARIZERS))
def test_penalty_transform_in_chain_equals_penalty_in_loss(name):
    """chain(regularizer(α), opt) on the loss == opt on loss + α·R, over several steps."""
    model = create_model("lenet300100")
    alpha, x = 3e-3, jax.random.uniform(jax.random.PRNGKey(1), (16, 28, 28, 1))
    y = jnp.arange(16) % 10
    penalty = penalties.PENALTIES[name]
    # SGD with momentum: Adam would amplify float rounding in near-zero gradients.
    chained = optax.chain(transforms.REGULARIZERS[name](alpha), optax.sgd(0.1, momentum=0.9))
    state_a = create_train_state(model, chained, jax.random.PRNGKey(0), (28, 28, 1))
    step_a = jax.jit(make_train_step(model, chained))

    def loss_with_penalty(logits, labels, params):
        return cross_entropy(logits, labels) + alpha * penalties.tree_penalty(penalty, params)

    plain = optax.sgd(0.1, momentum=0.9)
    state_b = create_train_state(model, plain, jax.random.PRNGKey(0), (28, 28, 1))

    @jax.jit
    def step_b(state):
        def objective(params):
            logits = model.apply({"params": params}, x)
            return loss_with_penalty(logits, y, params)
        grads = jax.grad(objective)(state.params)
        updates, opt_state = plain.update(grads, state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state)

    for _ in range(3):
        state_a, _ = step_a(state_a, x, y)
        state_b = step_b(state_b)
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_strength_schedule_is_followed():
    tx = transforms.l1_regularization(optax.linear_schedule(0.0, 1.0, 10))
    params = {"layer": {"kernel": jnp.ones((2, 2))}}
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    first, state = tx.update(zeros, state, params)
    assert float(first["layer"]["kernel"][0, 0]) == 0.0  # α(0) = 0
    for _ in range(4):
        upd, state = tx.update(zeros, state, params)
    assert float(upd["layer"]["kernel"][0, 0]) == pytest.approx(0.4)  # α(4) = 0.4


def test_penalty_transform_without_params_is_a_clear_error():
    tx = transforms.hoyer_square_regularization(1e-4)
    params = {"kernel": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))


@pytest.mark.parametrize("optimizer", [
    optax.adam(1e-2),
    optax.sgd(0.1, momentum=0.9),
    optax.adamw(1e-2, weight_decay=0.1),
])
def test_masked_fine_tuning_keeps_every_pruned_weight_exactly_zero(small_mnist, optimizer):
    model = create_model("lenet300100")
    dense = create_train_state(model, optax.adam(1e-3), jax.random.PRNGKey(0), (28, 28, 1))
    masks = magnitude_masks(dense.params, 0.9)
    # Start from *unmasked* params: masked must zero them on the first step, too.
    tx = transforms.masked_fine_tuning(optimizer, masks)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (28, 28, 1),
                               params=dense.params)
    state, history = fit(model, tx, small_mnist, epochs=2, batch_size=200, state=state,
                         progress=False)
    for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(masks)):
        assert bool(jnp.all(p[~m] == 0.0))
        assert bool(jnp.all(p[m] != 0.0))  # kept weights still train
    assert history[-1]["val_accuracy"] > 0.5  # it still learns


def test_masked_holds_zeros_whatever_the_optimizer_does():
    """Pruned weights not yet zero, momentum and decoupled weight decay: they end at exactly 0."""
    params = {"kernel": jnp.array([[0.5, 1.0]])}  # the first weight is pruned but not yet zero
    masks = {"kernel": jnp.array([[False, True]])}
    grads = {"kernel": jnp.array([[1.0, 1.0]])}
    tx = transforms.masked_fine_tuning(optax.adamw(0.1, weight_decay=0.5), masks)
    p, state = params, tx.init(params)
    for _ in range(3):
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
        assert float(p["kernel"][0, 0]) == 0.0 and float(p["kernel"][0, 1]) != 1.0
    # The optimizer's moments of the pruned weight never moved (its gradient was zeroed first).
    mu = state.inner_state[0].mu["kernel"]
    assert float(mu[0, 0]) == 0.0 and float(mu[0, 1]) != 0.0


def test_masks_are_in_the_state_not_baked_into_the_step():
    params = {"kernel": jnp.ones((2, 2))}
    tx = transforms.masked_fine_tuning(optax.sgd(0.1), {"kernel": jnp.ones((2, 2), bool)})
    state = tx.init(params)
    update = jax.jit(tx.update)
    grads = {"kernel": jnp.ones((2, 2))}
    # Swapping the masks in the state changes what the *same compiled* step prunes.
    other = transforms.MaskedState({"kernel": jnp.eye(2, dtype=bool)}, state.inner_state)
    updates, _ = update(grads, other, params)
    np.testing.assert_array_equal(optax.apply_updates(params, updates)["kernel"],
                                  jnp.array([[0.9, 0.0], [0.0, 0.9]]))
    assert update._cache_size() == 1
    nested = optax.chain(optax.clip(1.0), tx).init(params)
    np.testing.assert_array_equal(transforms.masks_in_state(nested)["kernel"],
                                  jnp.ones((2, 2), bool))
    assert transforms.masks_in_state(optax.adam(0.1).init(params)) is None


def test_mask_structure_mismatch_is_a_clear_error():
    params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2))}}
    tx = transforms.masked_fine_tuning(optax.sgd(0.1), {"a": {"kernel": jnp.ones((2, 2), bool)}})
    with pytest.raises(ValueError, match="same structure as params"):
        tx.init(params)
    assert jax.tree.structure(full_masks(params)) == jax.tree.structure(params)
    assert float(apply_masks(params, full_masks(params))["a"]["kernel"].sum()) == 4.0


def test_polynomial_sparsity_schedule():
    from hoyertrim.masks import polynomial_sparsity
    assert float(polynomial_sparsity(0, 0.9, 10, 110)) == 0.0
    assert float(polynomial_sparsity(110, 0.9, 10, 110)) == pytest.approx(0.9)
    assert float(polynomial_sparsity(60, 0.9, 10, 110)) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    assert float(polynomial_sparsity(500, 0.9, 10, 110)) == pytest.approx(0.9)


def test_gradual_magnitude_pruning_reaches_target_and_holds_zeros():
    key = jax.random.PRNGKey(0)
    params = {"dense0": {"kernel": jax.random.normal(key, (40, 25)), "bias": jnp.ones(25)},
              "dense1": {"kernel": jax.random.normal(jax.random.fold_in(key, 1), (25, 4)),
                         "bias": jnp.ones(4)}}
    tx = optax.chain(optax.sgd(1e-2, momentum=0.9), transforms.gradual_magnitude_pruning(
        {"dense0": 0.8, "dense1": 0.5}, begin_step=2, end_step=12, frequency=2))
    state = tx.init(params)
    update = jax.jit(tx.update)
    sparsities = []
    for step in range(20):
        grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01 * ((-1) ** step)), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        sparsities.append(float(jnp.mean(params["dense0"]["kernel"] == 0)))
    assert sparsities[0] == 0.0
    assert all(b >= a - 1e-9 for a, b in zip(sparsities[2:13], sparsities[3:13]))  # monotone
    assert float(jnp.mean(params["dense0"]["kernel"] == 0)) == pytest.approx(0.8)
    assert float(jnp.mean(params["dense1"]["kernel"] == 0)) == pytest.approx(0.5)
    assert bool(jnp.all(params["dense0"]["bias"] != 0))


def test_gradual_magnitude_pruning_refuses_a_layer_it_would_never_prune():
    params = {"dense0": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}
    tx = transforms.gradual_magnitude_pruning({"dense0": 0.5, "dense9": 0.5}, 0, 10)
    with pytest.raises(ValueError, match="names dense9.*selected layers are dense0"):
        tx.init(params)
    transforms.gradual_magnitude_pruning({"dense0": 0.5}, 0, 10).init(params)


def test_group_penalties_take_each_layers_own_groupings():
    """{layer: groupings}: the named layer's groups are its own (an attention kernel's heads),
    the others keep DeepHoyer's default groupings."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    params = {"query": {"kernel": jax.random.normal(keys[0], (8, 4, 2))},
              "dense": {"kernel": jax.random.normal(keys[1], (8, 3))}}
    heads = ((0, 2), (1, 2))
    for name, penalty in (("group_hoyer_square", penalties.group_hoyer_square),
                          ("group_lasso", penalties.group_lasso)):
        tx = transforms.REGULARIZERS[name](0.5, groupings={"query": heads})
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = tx.update(zeros, tx.init(params), params)
        expected = jax.grad(lambda p: penalty(p["query"]["kernel"], heads)
                            + penalty(p["dense"]["kernel"]))(params)
        for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
            np.testing.assert_allclose(u, 0.5 * e, rtol=1e-5, atol=1e-7)
        default, _ = transforms.REGULARIZERS[name](0.5).update(zeros, tx.init(params), params)
        assert not np.allclose(default["query"]["kernel"], updates["query"]["kernel"])


def test_groupings_naming_an_unknown_layer_are_refused():
    params = {"query": {"kernel": jnp.ones((8, 4, 2))}}
    tx = transforms.REGULARIZERS["group_hoyer_square"](0.5, groupings={"querry": ((0, 2),)})
    with pytest.raises(ValueError, match="params do not have"):
        tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
