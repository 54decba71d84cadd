import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from hoyertrim import penalties

jax.config.update("jax_enable_x64", False)

finite = st.floats(-100, 100, allow_nan=False, width=32)
# A few lengths (edge case 1 included), any values: each new shape costs a compile, each new
# value nothing, and the properties are about values.
vectors = hnp.arrays(np.float32, st.sampled_from([1, 2, 7, 40]), elements=finite).filter(
    lambda w: np.abs(w).max() > 1e-3)
matrices = hnp.arrays(np.float32, st.tuples(st.sampled_from([1, 3, 6]),
                                            st.sampled_from([1, 4])),
                      elements=finite).filter(lambda w: np.abs(w).max() > 1e-3)
scales = st.floats(0.01, 100, allow_nan=False).flatmap(lambda c: st.sampled_from([c, -c]))


@settings(max_examples=60, deadline=None)
@given(vectors, scales)
def test_hoyer_square_is_scale_invariant(w, c):
    np.testing.assert_allclose(penalties.hoyer_square(c * w), penalties.hoyer_square(w),
                               rtol=1e-4)


@settings(max_examples=60, deadline=None)
@given(vectors)
def test_hoyer_square_bounds(w):
    value = float(penalties.hoyer_square(w))
    assert 1 - 1e-5 <= value <= w.size * (1 + 1e-5)
    assert float(penalties.hoyer(w)) == pytest.approx(np.sqrt(value), rel=1e-4)


@settings(max_examples=60, deadline=None)
@given(vectors)
def test_hoyer_square_gradient_is_orthogonal_to_w(w):
    grad = jax.grad(penalties.hoyer_square)(jnp.asarray(w))
    # <∇HS, w> is the difference of two terms each equal to 2·HS(w); they must cancel.
    assert abs(float(jnp.vdot(grad, w))) <= 1e-4 * 2 * float(penalties.hoyer_square(w))


@settings(max_examples=40, deadline=None)
@given(matrices)
def test_group_hs_with_one_element_groups_is_hs(w):
    np.testing.assert_allclose(penalties.group_hoyer_square(w, groupings=[()]),
                               penalties.hoyer_square(w), rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(matrices, scales)
def test_group_hs_is_hs_of_group_norms_and_scale_invariant(w, c):
    columns, rows = np.linalg.norm(w, axis=0), np.linalg.norm(w, axis=1)
    expected = penalties.hoyer_square(columns) + penalties.hoyer_square(rows)
    np.testing.assert_allclose(penalties.group_hoyer_square(w), expected, rtol=1e-4)
    np.testing.assert_allclose(penalties.group_hoyer_square(c * w),
                               penalties.group_hoyer_square(w), rtol=1e-4)


@pytest.mark.parametrize("name", sorted(penalties.PENALTIES))
@pytest.mark.parametrize("shape", [(5,), (4, 3), (3, 3, 2, 4)])
def test_zero_tensor_gives_zero_value_and_finite_zero_gradient(name, shape):
    fn = penalties.PENALTIES[name]
    zero = jnp.zeros(shape)
    assert float(fn(zero)) == 0.0
    grad = jax.grad(fn)(zero)
    assert bool(jnp.all(grad == 0))


def test_zero_group_inside_nonzero_tensor_has_finite_gradient():
    w = jnp.array([[1.0, 0.0], [2.0, 0.0]])  # second column is a dead neuron
    for fn in (penalties.group_hoyer_square, penalties.group_lasso):
        assert bool(jnp.all(jnp.isfinite(jax.grad(fn)(w))))


def test_conv_groupings_are_filters_and_input_channels():
    w = jnp.zeros((3, 3, 2, 4)).at[..., 0, 1].set(1.0)  # one (input 0, filter 1) slice
    assert penalties.default_groupings(4) == ((0, 1, 2), (0, 1, 3))
    # A single nonzero filter and a single nonzero input channel: each grouping's HS is 1.
    assert float(penalties.group_hoyer_square(w)) == pytest.approx(2.0)
    assert float(penalties.group_lasso(w)) == pytest.approx(2 * 3.0)


def test_known_values():
    w = jnp.array([3.0, -4.0])
    assert float(penalties.l1(w)) == 7.0
    assert float(penalties.hoyer(w)) == pytest.approx(7 / 5)
    assert float(penalties.hoyer_square(w)) == pytest.approx(49 / 25)
    assert float(penalties.transformed_l1(w)) == pytest.approx(2 * 3 / 4 + 2 * 4 / 5)


def test_tree_penalty_selects_kernels_only():
    params = {"dense0": {"kernel": jnp.array([[3.0, -4.0]]), "bias": jnp.array([100.0])},
              "bn": {"scale": jnp.ones((2,))}}
    assert float(penalties.tree_penalty(penalties.l1, params)) == 7.0
    # a filter that selects nothing is an error, not a penalty of 0 (training would silently
    # run unregularized)
    with pytest.raises(ValueError, match="selects no parameter.*bias"):
        penalties.tree_penalty(penalties.l1, {"bias": jnp.ones(3)})


def test_bad_grouping_axis():
    with pytest.raises(ValueError, match="out of range"):
        penalties.group_hoyer_square(jnp.ones((2, 2)), groupings=[(5,)])


def test_coupled_groups_are_penalized_as_one_group_across_layers():
    from hoyertrim.inspection import CoupledGroup
    from hoyertrim.transforms import coupled_group_regularization
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    params = {"a": {"kernel": jax.random.normal(keys[0], (3, 3, 2, 4))},  # conv: units last
              "b": {"kernel": jax.random.normal(keys[1], (5, 4))}}
    groups = [CoupledGroup((("a", 0), ("b", 1))), CoupledGroup((("a", 2), ("b", 2)))]
    axes = {"a": 3, "b": 1}
    squares = penalties.coupled_group_squares(params, groups, axes)
    a, b = np.asarray(params["a"]["kernel"]), np.asarray(params["b"]["kernel"])
    expected = [np.sum(a[..., 0] ** 2) + np.sum(b[:, 1] ** 2),
                np.sum(a[..., 2] ** 2) + np.sum(b[:, 2] ** 2)]
    np.testing.assert_allclose(squares, expected, rtol=1e-5)
    norms = np.sqrt(expected)
    np.testing.assert_allclose(penalties.coupled_group_penalty(params, groups, axes),
                               norms.sum() ** 2 / np.sum(expected), rtol=1e-5)
    np.testing.assert_allclose(penalties.coupled_group_penalty(params, groups, axes,
                                                               "group_lasso"), norms.sum(),
                               rtol=1e-5)
    tx = coupled_group_regularization(0.5, groups, axes)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    grads = jax.grad(lambda p: penalties.coupled_group_penalty(p, groups, axes))(params)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
        np.testing.assert_allclose(u, 0.5 * g, rtol=1e-6)
    assert np.all(np.asarray(updates["a"]["kernel"])[..., 1] == 0)  # not in any group
    with pytest.raises(ValueError, match="no kernel"):
        penalties.coupled_group_squares(params, [CoupledGroup((("c", 0), ("a", 0)))],
                                        {"a": 3, "c": 0})
