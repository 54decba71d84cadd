"""Net-Trim on Flax models written the ordinary way (examples/user_models.py), not the zoo's.

Every certificate is recomputed here independently: the test runs the original and the pruned
model itself, applies the activation the model really uses (known from the model's source), and
compares with what `prune_network` reports.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import user_models as um
from hoyertrim import nettrim
from hoyertrim.inspection import Recorder, inspect_model

# name: (model factory, per-example input shape, apply kwargs, {layer: activation after it})
# The activation map is written from the models' source, independently of hoyertrim's graph
# analysis: "relu", "bn_relu" (BatchNorm in inference mode, then ReLU), "gelu", "tanh",
# "add" (residual add before the ReLU) or "out" (the model's output).
MODELS = {
    "flax_example_cnn": (um.FlaxExampleCNN, (8, 8, 1), {},
                         {"Conv_0": "relu", "Conv_1": "relu", "Dense_0": "relu", "Dense_1": "out"}),
    "conv_bn": (functools.partial(um.ConvBatchNormCNN, widths=(4, 8), hidden=16), (8, 8, 1),
                {"train": False}, {"Conv_0": "bn_relu", "Conv_1": "bn_relu", "Dense_0": "relu",
                                   "Dense_1": "out"}),
    "strided": (um.StridedCNN, (8, 8, 1), {},
                {"Conv_0": "relu", "Conv_1": "relu", "Conv_2": "relu", "Dense_0": "out"}),
    "separable": (um.SeparableCNN, (8, 8, 1), {},
                  {"Conv_0": "relu", "Conv_1": "relu", "Conv_2": "relu", "Conv_3": "relu",
                   "Dense_0": "out"}),
    "conv1d": (um.Conv1D, (16, 2), {}, {"Conv_0": "relu", "Conv_1": "relu", "Dense_0": "out"}),
    "setup_no_bias": (um.SetupMLP, (6, 6, 1), {},
                      {"hidden": "relu", "no_bias": "relu", "out": "out"}),
    "head_first": (um.HeadFirstMLP, (6, 6, 1), {},
                   {"first": "relu", "second": "relu", "head": "out"}),
    "gelu_tanh": (um.SmoothMLP, (6, 6, 1), {},
                  {"Dense_0": "gelu", "Dense_1": "tanh", "Dense_2": "out"}),
    "residual": (um.ResidualMLP, (6, 6, 1), {},
                 {"Dense_0": "relu", "Dense_1": "relu", "Dense_2": "add", "Dense_3": "out"}),
    "sequential": (um.sequential_mlp, (6, 6, 1), {},
                   {"layers_1": "relu", "layers_3": "relu", "layers_5": "out"}),
    "valid_cnn": (um.ValidCNN, (8, 8, 1), {}, {"Conv_0": "relu", "Conv_1": "relu",
                                               "Dense_0": "out"}),
}


def _build(name, samples=48):
    factory, shape, kwargs, acts = MODELS[name]
    model = factory()
    images = jax.random.normal(jax.random.PRNGKey(1), (samples, *shape))
    variables = model.init(jax.random.PRNGKey(0), images[:1], **kwargs)
    if "batch_stats" in variables:  # non-trivial running statistics, so the fold matters
        stats = variables["batch_stats"]
        keys = iter(jax.random.split(jax.random.PRNGKey(3), 8))
        variables = {**variables, "batch_stats": jax.tree.map(
            lambda a: a + 0.5 * jax.random.uniform(next(keys), a.shape), stats)}
        params = variables["params"]
        variables = {**variables, "params": jax.tree_util.tree_map_with_path(
            lambda p, a: a * 1.7 - 0.2 if p[-1].key == "scale" else a, params)}
    else:
        variables = variables["params"]
    return model, variables, images, kwargs, acts


def _outputs(model, variables, images, kwargs):
    """Each layer's output z, by intercepting the model's own calls (no hoyertrim code)."""
    seen = {}

    def interceptor(next_fun, args, kw, context):
        out = next_fun(*args, **kw)
        if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)):
            seen["/".join(context.module.path)] = np.asarray(out, np.float64)
        return out

    variables = variables if "params" in variables else {"params": variables}
    with nn.intercept_methods(interceptor):
        model.apply(variables, images, **kwargs)
    return seen


def _bn_affine(variables, index):
    """scale, shift of the index-th BatchNorm in inference mode, from its variables."""
    bn = variables["params"][f"BatchNorm_{index}"]
    stats = variables["batch_stats"][f"BatchNorm_{index}"]
    a = np.asarray(bn["scale"], np.float64) / np.sqrt(np.asarray(stats["var"], np.float64) + 1e-5)
    return a, np.asarray(bn["bias"], np.float64) - a * np.asarray(stats["mean"], np.float64)


def _certified_quantity(kind, z, variables, layer):
    z = z.reshape(-1, z.shape[-1])
    if kind == "relu":
        return np.maximum(z, 0)
    if kind == "bn_relu":
        a, c = _bn_affine(variables, int(layer.split("_")[-1]))
        return np.maximum(a * z + c, 0)
    return z  # linear program: the pre-activation


def _relative(new, old):
    return np.linalg.norm(new - old) / np.linalg.norm(old)


# The quick tier (pytest -m "not slow") runs these; the full suite runs every model and scheme.
_QUICK = {("setup_no_bias", "cascade"), ("residual", "parallel")}


@pytest.mark.parametrize("name, scheme", [
    pytest.param(n, s, marks=() if (n, s) in _QUICK else pytest.mark.slow)
    for n in sorted(MODELS) for s in ("parallel", "cascade")])
def test_user_model_prunes_with_independently_checked_certificates(name, scheme):
    model, variables, images, kwargs, acts = _build(name)
    pruned = nettrim.prune_network(model, variables, images, epsilon=0.1, scheme=scheme,
                                   apply_kwargs=kwargs, heldout=0, max_rows=10**6,
                                   progress=False)
    assert list(pruned.layers) == list(acts)  # call order, every kernel layer
    pruned_vars = pruned.variables or pruned.params
    # Same tree structure, shapes and dtypes as the input; other collections unchanged.
    assert jax.tree.structure(pruned_vars) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(pruned_vars), jax.tree.leaves(variables)):
        assert a.shape == b.shape and a.dtype == b.dtype
    if "batch_stats" in variables:
        for a, b in zip(jax.tree.leaves(pruned.variables["batch_stats"]),
                        jax.tree.leaves(variables["batch_stats"])):
            np.testing.assert_array_equal(a, b)
    original = _outputs(model, variables, images, kwargs)
    final = _outputs(model, pruned_vars, images, kwargs)
    params = variables["params"] if "params" in variables else variables
    for layer, kind in acts.items():
        report = pruned.layers[layer]
        expected_program = "relu" if kind in ("relu", "bn_relu") else "linear"
        assert report.program == expected_program, (layer, report.reason)
        if scheme == "parallel":  # the layer alone pruned, on the trained network's inputs
            alone = jax.tree.map(lambda a: a, params)
            alone = _set_layer(alone, layer, _get_layer(pruned.params, layer))
            alone_vars = {**variables, "params": alone} if "params" in variables else alone
            z_new = _outputs(model, alone_vars, images, kwargs)[layer]
        else:
            z_new = final[layer]
        independent = _relative(_certified_quantity(kind, z_new, variables, layer),
                                _certified_quantity(kind, original[layer], variables, layer))
        assert report.measured == pytest.approx(independent, rel=1e-3, abs=1e-6)
        assert independent <= report.epsilon_certified * (1 + 1e-5)
        if kind in ("gelu", "tanh"):  # the bound the linear certificate implies on the output
            act, lipschitz = (jax.nn.gelu, 1.129) if kind == "gelu" else (jnp.tanh, 1.0)
            assert report.lipschitz in (None, lipschitz)  # inlined gelu is not recognised
            out_error = np.linalg.norm(np.asarray(act(z_new)) - np.asarray(act(original[layer])))
            assert out_error <= lipschitz * report.epsilon_certified * np.linalg.norm(
                original[layer]) * (1 + 1e-5)
        # masks mark exactly the kernel's nonzeros, and something was pruned somewhere
        np.testing.assert_array_equal(_get_layer(pruned.masks, layer)["kernel"],
                                      _get_layer(pruned.params, layer)["kernel"] != 0)
    assert min(r.kept_fraction for r in pruned.layers.values()) < 1.0


def _get_layer(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set_layer(tree, path, value):
    keys = path.split("/")
    node = tree
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return tree


def test_gelu_and_tanh_layers_are_never_certified_as_relu():
    model, params, images, kwargs, _ = _build("gelu_tanh")
    followers = inspect_model(model, params, images[:2], apply_kwargs=kwargs).followers
    assert [f.program for f in followers.values()] == ["linear"] * 3
    assert "tanh" in followers["Dense_1"].reason and followers["Dense_1"].lipschitz == 1.0
    # nn.gelu is written inline (z feeds x³, x·(…) and x + …): recognised by what it computes
    assert followers["Dense_0"].activation == "gelu" and followers["Dense_0"].lipschitz == 1.129
    # (the certificates of this model are recomputed with gelu/tanh in
    # test_user_model_prunes_...[gelu_tanh-*])


def test_user_declared_program_overrides_the_graph():
    from hoyertrim.inspection import graph
    found = {"layers_1": graph.relu_follower(32, "graph"), "layers_3": graph.Follower("linear", "g")}
    declared = graph.override(found, {"layers_1": "linear", "layers_3": "relu"}, lambda n: 24)
    assert declared["layers_1"].program == "linear" and "user" in declared["layers_1"].reason
    assert declared["layers_3"].program == "relu" and declared["layers_3"].scale.shape == (24,)
    model, params, images, kwargs, _ = _build("sequential")
    with pytest.raises(ValueError, match="must be 'relu' or 'linear'"):
        nettrim.prune_network(model, params, images, epsilon=0.1, progress=False,
                              activations={"layers_1": "gelu"})
    with pytest.raises(ValueError, match="unknown layer"):
        nettrim.prune_network(model, params, images, epsilon=0.1, progress=False,
                              activations={"layers_9": "relu"})


@pytest.mark.slow  # seconds, not milliseconds: keeps the quick tier under 90 s
def test_batchnorm_is_folded_with_its_exact_affine_map():
    model, variables, images, kwargs, _ = _build("conv_bn")
    followers = inspect_model(model, variables, images[:2], apply_kwargs=kwargs).followers
    for index, layer in enumerate(["Conv_0", "Conv_1"]):
        a, c = _bn_affine(variables, index)
        np.testing.assert_allclose(followers[layer].scale, a, rtol=1e-6)
        np.testing.assert_allclose(followers[layer].shift, c, rtol=1e-5, atol=1e-6)
    assert "folding" in followers["Conv_0"].reason
    # Pruning through the fold (exact zeros, no invented bias, certificates recomputed with the
    # BatchNorm) is checked on this model by test_user_model_prunes_...[conv_bn-*].


def test_dense_general_is_a_linear_map_and_unknown_layers_are_refused():
    model = um.WithDenseGeneral()
    images = jax.random.normal(jax.random.PRNGKey(1), (32, 6, 6, 1))
    params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
    found = inspect_model(model, params, images[:2])
    assert [m.name for m in found.maps] == ["Dense_0", "DenseGeneral_0", "Dense_1"]
    assert found.maps[1].num_outputs == 16 and found.followers["DenseGeneral_0"].program == "relu"
    with pytest.raises(ValueError, match="Unknown layers"):
        nettrim.prune_network(model, params, images, epsilon=0.1, layers=["dense9"])


@pytest.mark.slow
def test_layers_skips_an_unsupported_layer():
    model = um.WithDenseGeneral()
    images = jax.random.normal(jax.random.PRNGKey(1), (32, 6, 6, 1))
    params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
    pruned = nettrim.prune_network(model, params, images, epsilon=0.1, progress=False,
                                   layers=["Dense_0", "Dense_1"])
    assert list(pruned.layers) == ["Dense_0", "Dense_1"]
    np.testing.assert_array_equal(pruned.params["DenseGeneral_0"]["kernel"],
                                  params["DenseGeneral_0"]["kernel"])


@pytest.mark.parametrize("conv", [
    dict(features=6, kernel_size=(3, 3)),
    dict(features=6, kernel_size=(5, 5), strides=(2, 2), padding="SAME"),
    dict(features=6, kernel_size=(3, 2), padding=((2, 0), (1, 3)), kernel_dilation=(2, 1)),
    dict(features=6, kernel_size=(3, 3), input_dilation=(2, 2), padding=((1, 1), (0, 2))),
    dict(features=6, kernel_size=(3, 3), padding="CIRCULAR", strides=(1, 2)),
    dict(features=6, kernel_size=(3, 3), feature_group_count=3),
    dict(features=4, kernel_size=(1, 1), use_bias=False),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k != "features"))
def test_conv_patches_reproduce_lax_conv(conv):
    module = nn.Conv(**conv)
    images = jax.random.normal(jax.random.PRNGKey(0), (3, 9, 8, 6))
    variables = module.init(jax.random.PRNGKey(1), images)
    expected = jax.lax.conv_general_dilated(
        images, variables["params"]["kernel"],
        window_strides=conv.get("strides", (1, 1)),
        padding=_lax_padding(conv, variables["params"]["kernel"].shape),
        lhs_dilation=conv.get("input_dilation"), rhs_dilation=conv.get("kernel_dilation"),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=conv.get("feature_group_count", 1),
        precision=jax.lax.Precision.HIGHEST) if conv.get("padding") != "CIRCULAR" else \
        module.apply(variables, images)
    if conv.get("use_bias", True) and conv.get("padding") != "CIRCULAR":
        expected = expected + variables["params"]["bias"]
    params = variables["params"]
    found = inspect_model(module, params, images[:2])
    (lmap,) = found.maps
    recorded = np.asarray(images)
    if conv.get("padding") == "CIRCULAR":  # linen pads first: the conv's operand is padded
        recorded = Recorder(found.computation, found.maps)(params, np.asarray(images),
                                                           [lmap.name])[1][lmap.name][0]
    rows = lmap.input_rows(recorded, None)
    matrix = lmap.matrix(params)
    bias = lmap.bias(params)
    got = rows @ matrix + (0 if bias is None else bias)
    np.testing.assert_allclose(got, np.asarray(expected).reshape(got.shape), atol=1e-5)
    # the matrix round-trips to the same kernel, and only real entries are in the support
    back = lmap.with_matrix(params, matrix, bias)
    np.testing.assert_array_equal(back["kernel"], params["kernel"])
    support = lmap.support()
    assert support is None or support.sum() == params["kernel"].size
    sampled = np.array([0, 7, 40, len(rows) - 1])
    np.testing.assert_array_equal(lmap.input_rows(recorded, sampled), rows[sampled])


def _lax_padding(conv, kernel_shape):
    padding = conv.get("padding", "SAME")
    return padding if isinstance(padding, str) else tuple(padding)


@pytest.mark.slow
def test_kept_fraction_mode_meets_each_layers_target():
    model, params, images, _, _ = _build("setup_no_bias", samples=64)
    pruned = nettrim.prune_network(model, params, images, kept_fraction=0.3, progress=False)
    for layer, report in pruned.layers.items():
        assert abs(report.kept_fraction - 0.3) <= nettrim.KEPT_FRACTION_TOLERANCE, layer
        assert report.mode == "kept_fraction"
        assert report.measured <= report.epsilon_certified


@pytest.mark.slow
def test_kept_fraction_per_layer():
    model, params, images, _, _ = _build("setup_no_bias", samples=96)
    per_layer = nettrim.prune_network(model, params, images, progress=False,
                                      kept_fraction={"hidden": 0.5, "no_bias": 0.2, "out": 0.4})
    for layer, target in {"hidden": 0.5, "no_bias": 0.2, "out": 0.4}.items():
        assert abs(per_layer.layers[layer].kept_fraction - target) <= 0.005


@pytest.mark.slow  # seconds, not milliseconds: keeps the quick tier under 90 s
def test_infeasible_cascade_solve_falls_back_to_the_trained_weights():
    model, params, images, _, _ = _build("sequential")

    def starved(x, y, **kwargs):  # one solve of one iteration: it cannot meet ε
        return nettrim.solve_layer(x, y, **kwargs, options=nettrim.SolverOptions(
            maxiter=1, max_solves=1, presolve_samples=None))

    with pytest.warns(UserWarning, match="could not meet epsilon"):
        pruned = nettrim.prune_network(model, params, images, epsilon=0.05, scheme="cascade",
                                       solver=starved, progress=False)
    for layer, report in pruned.layers.items():
        assert report.fallback and "trained weights" in report.fallback
        np.testing.assert_array_equal(pruned.params[layer]["kernel"], params[layer]["kernel"])
        assert report.measured <= report.epsilon_certified


def test_heldout_reports_agreement_and_logits_error():
    model, params, images, _, _ = _build("sequential", samples=64)
    pruned = nettrim.prune_network(model, params, images, epsilon=0.05, progress=False,
                                   heldout=0.25)
    assert pruned.heldout["samples"] == 16
    assert all(r.heldout_measured is not None for r in pruned.layers.values())
    assert all(r.samples == 48 for r in pruned.layers.values())
    # Given held-out inputs, the reported figures equal an independent computation.
    held = images[:16]
    pruned = nettrim.prune_network(model, params, images[16:], epsilon=0.05, progress=False,
                                   heldout=held)
    before = np.asarray(model.apply({"params": params}, held), np.float64)
    after = np.asarray(model.apply({"params": pruned.params}, held), np.float64)
    assert pruned.heldout["top1_agreement"] == pytest.approx(
        np.mean(np.argmax(after, -1) == np.argmax(before, -1)))
    assert pruned.heldout["logits_relative_error"] == pytest.approx(
        np.linalg.norm(after - before) / np.linalg.norm(before), rel=1e-4)
    assert pruned.heldout["logits_relative_error"] > 0  # it did prune


def test_frozen_variables_come_back_frozen():
    from flax.core import FrozenDict, freeze
    model, params, images, _, _ = _build("sequential")
    pruned = nettrim.prune_network(model, freeze(params), images, epsilon=0.2, progress=False)
    assert isinstance(pruned.params, FrozenDict)
    assert jax.tree.structure(pruned.params) == jax.tree.structure(freeze(params))


def test_cascade_layer_whose_inputs_moved_too_far_keeps_its_weights():
    model, params, images, _, _ = _build("sequential")
    # γ so large that every later layer's ε = √γ × (trained weights' discrepancy) is ≥ 1.
    pruned = nettrim.prune_network(model, params, images, epsilon=0.3, scheme="cascade",
                                   gamma=1e8, progress=False)
    first, *later = pruned.layers.values()
    assert first.fallback is None and first.kept_fraction < 1
    for report in later:
        assert "nothing pruned" in report.fallback and report.kept_fraction == 1.0
        assert report.epsilon_certified >= 1 and report.measured <= report.epsilon_certified
