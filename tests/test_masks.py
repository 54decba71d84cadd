import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hoyertrim import masks as masks_lib
from hoyertrim.models import create_model


def _params():
    key = jax.random.PRNGKey(0)
    return {"dense0": {"kernel": jax.random.normal(key, (20, 10)), "bias": jnp.ones(10)},
            "dense1": {"kernel": jax.random.normal(jax.random.fold_in(key, 1), (10, 5)),
                       "bias": jnp.ones(5)}}


def test_threshold_and_std_rules():
    params = _params()
    m = masks_lib.threshold_masks(params, 1.0)
    np.testing.assert_array_equal(m["dense0"]["kernel"], jnp.abs(params["dense0"]["kernel"]) >= 1)
    assert bool(jnp.all(m["dense0"]["bias"]))  # biases untouched by default
    s = masks_lib.std_threshold_masks(params, 0.5)
    w = params["dense1"]["kernel"]
    np.testing.assert_array_equal(s["dense1"]["kernel"], jnp.abs(w) >= 0.5 * jnp.std(w))


def test_magnitude_layer_global_and_per_layer_mapping():
    params = _params()
    m = masks_lib.magnitude_masks(params, 0.75)
    assert int(m["dense0"]["kernel"].sum()) == 50  # 25% of 200
    assert int(m["dense1"]["kernel"].sum()) == round(0.25 * 50)  # 12 (round half to even)
    g = masks_lib.magnitude_masks(params, 0.5, scope="global")
    assert int(g["dense0"]["kernel"].sum() + g["dense1"]["kernel"].sum()) == 125
    kept = jnp.concatenate([params["dense0"]["kernel"][g["dense0"]["kernel"]],
                            params["dense1"]["kernel"][g["dense1"]["kernel"]]])
    dropped = jnp.concatenate([params["dense0"]["kernel"][~g["dense0"]["kernel"]],
                               params["dense1"]["kernel"][~g["dense1"]["kernel"]]])
    assert float(jnp.abs(kept).min()) >= float(jnp.abs(dropped).max())
    p = masks_lib.magnitude_masks(params, {"dense0": 0.9})
    assert int(p["dense0"]["kernel"].sum()) == 20 and bool(jnp.all(p["dense1"]["kernel"]))
    with pytest.raises(ValueError, match="sparsity"):
        masks_lib.magnitude_masks(params, 1.0)


def test_count_masks_keep_exact_counts():
    m = masks_lib.count_masks(_params(), {"dense0": 7, "dense1": 0})
    assert int(m["dense0"]["kernel"].sum()) == 7 and int(m["dense1"]["kernel"].sum()) == 0


@pytest.mark.slow  # seconds, not milliseconds: keeps the quick tier under 90 s
def test_group_masks_remove_whole_units():
    w = jnp.ones((4, 3)).at[:, 1].set(1e-3).at[2, :].set(1e-3)
    m = masks_lib.group_masks({"l": {"kernel": w}}, fraction_of_max=0.1)["l"]["kernel"]
    assert not bool(jnp.any(m[:, 1])) and not bool(jnp.any(m[2, :]))
    assert int(m.sum()) == 3 * 2
    conv = jnp.ones((3, 3, 2, 4)).at[..., 3].set(0.0)
    mc = masks_lib.group_masks({"c": {"kernel": conv}}, fraction_of_max=0.1, grouping="output")["c"]["kernel"]
    assert not bool(jnp.any(mc[..., 3])) and bool(jnp.all(mc[..., :3]))


def test_pruning_everything_keeps_largest_weight_and_warns():
    params = _params()
    with pytest.warns(UserWarning, match="every weight of layer 'dense1'"):
        m = masks_lib.threshold_masks(params, 100.0)
    w = params["dense1"]["kernel"]
    assert int(m["dense1"]["kernel"].sum()) == 1
    assert bool(m["dense1"]["kernel"].reshape(-1)[jnp.argmax(jnp.abs(w))])


def test_sparsity_report_counts_and_flops():
    model = create_model("lenet5")
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    dense = masks_lib.sparsity_report(params, model, (28, 28, 1))
    # conv0 24·24 positions, conv1 8·8: 2·(500·576 + 25000·64 + 400000 + 5000).
    assert dense.flops("dense") == 2 * (500 * 576 + 25000 * 64 + 400000 + 5000)
    assert dense.compression == pytest.approx(1.0)
    # Kill filters 10..19 of conv0: they are dead outputs of conv0 and dead inputs of conv1.
    pruned = jax.tree.map(lambda x: x, params)
    pruned["conv0"]["kernel"] = params["conv0"]["kernel"].at[..., 10:].set(0)
    pruned["conv1"]["kernel"] = params["conv1"]["kernel"].at[:, :, 10:, :].set(0)
    report = masks_lib.sparsity_report(pruned, model, (28, 28, 1))
    conv0, conv1 = report.layers[0], report.layers[1]
    assert (conv0.outputs_alive, conv1.inputs_alive) == (10, 10)
    assert conv1.structured_flops == 2 * 25 * 10 * 50 * 64
    assert conv1.sparse_flops == 2 * 12500 * 64
    assert report.architecture.startswith("10-50-")
    assert report.compression == pytest.approx(430500 / (430500 - 250 - 12500))
    assert "| conv0 | 5x5x1x20 |" in report.markdown()


def test_report_lists_layers_in_call_order_for_a_head_first_model():
    from examples.user_models import HeadFirstMLP
    model = HeadFirstMLP()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 1)))["params"]
    report = masks_lib.sparsity_report(params, model, (6, 6, 1))
    assert [l.name for l in report.layers] == ["first", "second", "head"]
    assert report.architecture == "36-32-24"  # inputs alive of each dense layer, in order
    unordered = masks_lib.sparsity_report(params)  # no model: the params tree's order
    assert [l.name for l in unordered.layers] == ["first", "head", "second"]
    assert report.sparsity == pytest.approx(1 - report.kept_fraction)


def test_group_rules_absolute_relative_and_std():
    w = jnp.ones((4, 3)).at[:, 1].set(0.01)  # column norms 2, 0.02, 2; row norms ~1.41
    kernel = {"l": {"kernel": w}}
    absolute = masks_lib.group_masks(kernel, threshold=1.0, grouping="output")["l"]["kernel"]
    relative = masks_lib.group_masks(kernel, fraction_of_max=0.5, grouping="output")["l"]["kernel"]
    by_std = masks_lib.group_masks(kernel, std_scale=1.0, grouping="output")["l"]["kernel"]
    for m in (absolute, relative, by_std):
        np.testing.assert_array_equal(m.any(axis=0), [True, False, True])
    with pytest.raises(ValueError, match="exactly one"):
        masks_lib.group_masks(kernel, threshold=1.0, std_scale=1.0)


def test_rules_run_under_jit_with_the_never_empty_guard():
    params = _params()
    jitted = jax.jit(lambda p: masks_lib.threshold_masks(p, 100.0))(params)  # would empty all
    assert int(jitted["dense1"]["kernel"].sum()) == 1
    magnitude = jax.jit(lambda p: masks_lib.magnitude_masks(p, 0.5))(params)
    assert int(magnitude["dense0"]["kernel"].sum()) == params["dense0"]["kernel"].size // 2


def test_top_k_keeps_exact_counts_and_breaks_ties_by_index():
    scores = jnp.array([1.0, 3.0, 3.0, 2.0, 3.0])
    np.testing.assert_array_equal(masks_lib.top_k_mask(scores, 2), [0, 1, 1, 0, 0])
    np.testing.assert_array_equal(masks_lib.top_k_mask(scores, 0), [0] * 5)
    traced = jax.jit(masks_lib.top_k_mask)(scores, jnp.int32(4))
    np.testing.assert_array_equal(traced, [0, 1, 1, 1, 1])
    # global magnitude pruning keeps exactly the count even with ties across layers
    tied = {"a": {"kernel": jnp.ones((3, 2))}, "b": {"kernel": jnp.ones((2, 2))}}
    kept = masks_lib.magnitude_masks(tied, 0.3, scope="global")
    assert sum(int(m.sum()) for m in jax.tree.leaves(kept)) == 7  # 10 weights, 3 removed
    assert int(kept["b"]["kernel"].sum()) == 1  # ties go to the earlier leaf


def test_input_unit_masks_keep_the_largest_units_to_the_count():
    from hoyertrim.pipeline import prune_masks
    dense = np.arange(1, 7, dtype=np.float32)[:, None] * np.ones((6, 4), np.float32)  # rows 1..6
    dense[2] *= 10  # the third row is the largest
    conv = np.ones((3, 3, 4, 5), np.float32) * np.array([0.5, 3.0, 1.0, 2.0])[:, None]
    params = {"dense0": {"kernel": dense, "bias": np.ones(4)},
              "conv0": {"kernel": conv, "bias": np.ones(5)}}
    masks = masks_lib.input_unit_masks(params, 0.5)
    np.testing.assert_array_equal(np.asarray(masks["dense0"]["kernel"])[:, 0],
                                  [False, False, True, False, True, True])
    assert np.asarray(masks["dense0"]["kernel"]).all(axis=1).sum() == 3
    kept = np.asarray(masks["conv0"]["kernel"])
    assert kept[:, :, [1, 3]].all() and not kept[:, :, [0, 2]].any()
    assert np.asarray(masks["dense0"]["bias"]).all()
    np.testing.assert_array_equal(np.asarray(prune_masks(params, "units", 0.5)["conv0"]["kernel"]),
                                  kept)


def test_group_masks_take_each_layers_own_groupings():
    """An attention output kernel (heads, head dim, D) grouped by head: a weak head goes whole,
    where the default groupings would cut along the head dimension."""
    from hoyertrim.masks import group_masks
    kernel = np.ones((4, 2, 8), np.float32)
    kernel[1] *= 0.01  # head 1
    params = {"out": {"kernel": kernel}}
    by_head = group_masks(params, fraction_of_max=0.1, grouping="input",
                          groupings={"out": ((0, 1), (1, 2))})["out"]["kernel"]
    np.testing.assert_array_equal(np.asarray(by_head).all(axis=(1, 2)), [True, False, True, True])
    assert np.asarray(by_head)[[0, 2, 3]].all()
    default = group_masks(params, fraction_of_max=0.1, grouping="input")["out"]["kernel"]
    assert np.asarray(default).all()  # per head dimension, no group is weak


def test_input_unit_masks_keep_whole_heads_given_the_groupings():
    from hoyertrim.masks import input_unit_masks
    kernel = np.ones((4, 2, 8), np.float32) * np.array([3.0, 1.0, 2.0, 0.5])[:, None, None]
    params = {"out": {"kernel": kernel}}
    mask = np.asarray(input_unit_masks(params, 0.5, groupings={"out": ((0, 1), (1, 2))})[
        "out"]["kernel"])
    np.testing.assert_array_equal(mask.all(axis=(1, 2)), [True, False, True, False])
    np.testing.assert_array_equal(mask.any(axis=(1, 2)), mask.all(axis=(1, 2)))  # whole heads


def test_groupings_naming_an_unknown_layer_are_refused():
    from hoyertrim.masks import group_masks, input_unit_masks
    params = {"out": {"kernel": np.ones((4, 2, 8), np.float32)}}
    with pytest.raises(ValueError, match="params do not have"):
        group_masks(params, fraction_of_max=0.1, groupings={"ouT": ((0, 1), (1, 2))})
    with pytest.raises(ValueError, match="params do not have"):
        input_unit_masks(params, 0.5, groupings={"ouT": ((0, 1), (1, 2))})
