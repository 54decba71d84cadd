"""Models a user brings in 2026 (examples/modern_models.py): NNX MLP, NNX CNN + BatchNorm, NNX
ViT, linen ViT with MultiHeadDotProductAttention, a linen decoder block with causal Einsum /
DenseGeneral attention, and a plain JAX function. Every figure is checked against an
independent computation: penalties over the kernels listed by hand, mask rules in NumPy, FLOPs
counted by hand, and Net-Trim's certificates recomputed from each layer's output captured by
the frameworks' own means (linen `intercept_methods`, a recording subclass for NNX modules,
the function's own algebra) — not by hoyertrim's jaxpr inspection.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import flax.linen as nn
from flax import nnx

from examples import modern_models as mm
from hoyertrim import masks, nettrim, penalties
from hoyertrim.inspection import as_computation, contraction_filter, inspect_model
from hoyertrim import peers
from hoyertrim.trees import path_string

IMAGES = jax.random.normal(jax.random.PRNGKey(1), (48, 8, 8, 1))
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (48, 8), 0, 32)


def _mnist_8x8(images):
    """MNIST at the models' 8×8: the central 24×24 pixels, averaged over 3×3 blocks."""
    n = len(images)
    return np.asarray(images)[:, 2:26, 2:26, 0].reshape(n, 8, 3, 8, 3).mean((2, 4))[..., None]


def _pixel_tokens(images8):
    """A sequence of 8 tokens per image for the decoder: its rows' mean ink in 32 levels."""
    rows = images8[..., 0].mean(axis=-1)
    return np.clip((rows / 0.5 * 32).astype(np.int32), 0, 31)


def _train(name, model, variables, images, labels, steps: int = 150):
    """The model trained briefly (Adam 3e-3, batch 128) on MNIST at 8×8: to the labels, or for
    the decoder, to predict each next pixel-row token. Returns (model, variables, final loss,
    first loss)."""
    computation = as_computation(model, variables)
    inputs = _pixel_tokens(images) if name == "decoder" else images.astype(np.float32)

    def loss_fn(params, x, y):
        out = computation.apply(params, x)
        logits, targets = (out[:, :-1], x[:, 1:]) if name == "decoder" else (out, y)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    tx = optax.adam(3e-3)
    params = computation.params
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    order = np.random.default_rng(0).permutation(len(inputs))
    losses = []
    for i in range(steps):
        batch = order[(i * 128) % len(order):][:128]
        params, state, loss = step(params, state, inputs[batch], labels[batch])
        losses.append(float(loss))
    trained = computation.rebuild(params)
    if isinstance(model, nnx.Module):
        return trained, None, losses[-1], losses[0]
    return model, trained, losses[-1], losses[0]


@pytest.fixture(scope="module")
def trained(mnist):
    """``name -> (model, variables, inputs)``: each model trained briefly on MNIST (cached), and
    48 held-out test images (the decoder: their token sequences)."""
    images = _mnist_8x8(mnist.train.images[:12800])
    labels = np.asarray(mnist.train.labels[:12800])
    test = _mnist_8x8(mnist.test.images[:48])
    cache = {}

    def get(name):
        if name not in cache:
            model, variables, *_ = _build(name)
            model, variables, last, first = _train(name, model, variables, images, labels)
            # It learned something: classifiers lose 30% of their loss; the decoder predicts the
            # next token better than the tokens' own frequencies could (it uses the context).
            bound = _unigram_entropy(_pixel_tokens(images)[:, 1:]) if name == "decoder" \
                else 0.7 * first
            assert last < bound, (name, first, last, bound)
            inputs = _pixel_tokens(test) if name == "decoder" else jnp.asarray(test)
            cache[name] = (model, variables, inputs)
        return cache[name]

    return get


def _unigram_entropy(tokens) -> float:
    p = np.bincount(tokens.ravel(), minlength=32) / tokens.size
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


def _setup(name, request, quick: bool = False):
    """`_build`'s tuple, with the model trained on MNIST (`trained`) unless ``quick``."""
    built = _build(name)
    if quick:
        return built
    model, variables, inputs = request.getfixturevalue("trained")(name)
    return (model, variables, inputs, *built[3:])


def _build(name):
    """(model, variables, inputs, {layer: kernel path}, hand-counted FLOPs per example,
    {layer: program}), at random initialization on random inputs."""
    key = jax.random.PRNGKey(0)
    if name == "nnx_mlp":
        model = mm.NnxMLP(64, rngs=nnx.Rngs(0))
        return (model, None, IMAGES, ["hidden", "out"], 2 * (64 * 24 + 24 * 10),
                {"hidden": "relu", "out": "linear"})
    if name == "nnx_cnn":
        model = mm.NnxCNN(rngs=nnx.Rngs(0))
        for bn in (model.bn1, model.bn2):  # non-trivial statistics, so the fold matters
            bn.mean[...] = 0.3 * jnp.arange(bn.mean.shape[0], dtype=jnp.float32) / 8
            bn.var[...] = 1.5 + jnp.arange(bn.var.shape[0], dtype=jnp.float32) / 8
        flops = 2 * (9 * 4 * 64 + 36 * 8 * 16 + 32 * 16 + 16 * 10)  # SAME convs: 64, 16 positions
        return (model, None, IMAGES, ["conv1", "conv2", "linear1", "linear2"], flops,
                {"conv1": "relu", "conv2": "relu", "linear1": "relu", "linear2": "linear"})
    if name == "nnx_vit":
        model = mm.NnxViT(rngs=nnx.Rngs(0))
        tokens, d = 4, 16
        flops = 2 * tokens * (16 * d + 4 * d * d + 2 * d * 2 * d) + 2 * d * 10
        layers = ["embed"] + [f"blocks/0/attn/{p}" for p in ("query", "key", "value", "out")] + \
            ["blocks/0/fc1", "blocks/0/fc2", "head"]
        return model, None, IMAGES, layers, flops, {n: "linear" for n in layers}
    if name == "linen_vit":
        model = mm.LinenViT()
        tokens, d = 4, 16
        flops = 2 * tokens * (16 * d + 4 * d * d + 2 * d * 2 * d) + 2 * d * 10
        layers = ["embed"] + [f"attn/{p}" for p in ("query", "key", "value", "out")] + \
            ["fc1", "fc2", "head"]
        return (model, model.init(key, IMAGES[:1])["params"], IMAGES, layers, flops,
                {n: "linear" for n in layers})
    if name == "decoder":
        model = mm.LinenDecoderBlock()
        tokens, d = 8, 16
        flops = 2 * tokens * (4 * d * d + 2 * d * 2 * d + d * 32)
        layers = ["query", "key", "value", "out", "mlp_in", "mlp_out", "lm_head"]
        return (model, model.init(key, TOKENS[:1])["params"], TOKENS, layers, flops,
                {n: "linear" for n in layers})
    assert name == "function"
    params = mm.mlp_function_params(key, 64)
    return (mm.mlp_function, params, IMAGES, ["w1", "w2"], 2 * (64 * 24 + 24 * 10),
            {"w1": "relu", "w2": "linear"})


MODELS = ["nnx_mlp", "nnx_cnn", "nnx_vit", "linen_vit", "decoder", "function"]


def _params(model, variables):
    return nnx.state(model, nnx.Param) if isinstance(model, nnx.Module) else variables


def _kernels(model, variables, layers):
    """{layer: kernel} read by hand from the params tree."""
    params = _params(model, variables)
    flat = {path_string(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    return {n: flat[n if n in flat else f"{n}/kernel"] for n in layers}


@pytest.mark.parametrize("name", MODELS)
def test_linear_maps_are_found_with_their_programs(name):
    model, variables, inputs, layers, flops, programs = _build(name)
    found = inspect_model(model, variables, inputs[:2])
    assert [m.name for m in found.maps] == layers
    assert {n: f.program for n, f in found.followers.items()} == programs
    # tied weights or embeddings are refused with a reason, never taken as maps
    if name == "decoder":
        assert [r.name for r in found.refusals] == ["embed/embedding"]
        assert "gather" in found.refusals[0].reason


@pytest.mark.parametrize("name, quick", [(n, True) for n in MODELS] + [
    pytest.param(n, False, marks=pytest.mark.slow) for n in MODELS])
def test_penalties_masks_and_flops_match_independent_computations(name, quick, request):
    model, variables, inputs, layers, flops, _ = _setup(name, request, quick)
    params = _params(model, variables)
    kernels = _kernels(model, variables, layers)
    where = contraction_filter(model, variables, inputs[:2])
    expected = sum(float(np.abs(k).sum()) ** 2 / float((k ** 2).sum()) for k in kernels.values())
    got = float(penalties.tree_penalty(penalties.hoyer_square, params, where))
    assert got == pytest.approx(expected, rel=1e-5)
    if name != "function":  # the default (leaves named 'kernel') selects the same weights
        assert float(penalties.tree_penalty(penalties.hoyer_square, params)) == pytest.approx(
            expected, rel=1e-5)
    else:  # a plain function's weights are not named 'kernel': an error, never a penalty of 0
        with pytest.raises(ValueError, match="selects no parameter"):
            penalties.tree_penalty(penalties.hoyer_square, params)
    mask = masks.std_threshold_masks(params, 0.5, where=where)
    assert type(mask) is type(params)
    mask_leaves = {path_string(p): np.asarray(m)
                   for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    for layer, k in kernels.items():
        key = layer if layer in mask_leaves else f"{layer}/kernel"
        np.testing.assert_array_equal(mask_leaves[key], (np.abs(k) >= 0.5 * k.std()) & (k != 0))
    report = masks.sparsity_report(params, model, sample=inputs[:1], where=where)
    assert [layer.name for layer in report.layers] == layers
    assert report.flops("dense") == flops
    assert report.weights == sum(k.size for k in kernels.values())


def _capture(name, model, variables, inputs):
    """{layer: output (rows, M)} by the framework's own means, not by hoyertrim."""
    seen = {}
    if isinstance(model, nnx.Module):
        recorded_types = (nnx.Linear, nnx.LinearGeneral, nnx.Conv)
        for path, module in nnx.iter_modules(model):
            if isinstance(module, recorded_types):
                base = type(module)
                label = "/".join(map(str, path))

                class Recording(base):
                    def __call__(self, x, *args, _label=label, _base=base, **kwargs):
                        out = _base.__call__(self, x, *args, **kwargs)
                        seen[_label] = np.asarray(out, np.float64).reshape(
                            -1, int(np.prod(self.kernel.shape[-1:] if _base is not
                                            nnx.LinearGeneral else self.kernel.shape[1:])))
                        return out

                module.__class__ = Recording
        try:
            nnx.view(model, **_flags(model))(inputs)
        finally:
            for _, module in nnx.iter_modules(model):
                if type(module).__name__ == "Recording":
                    module.__class__ = type(module).__mro__[1]
        return seen
    if isinstance(model, nn.Module):
        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and isinstance(
                    context.module, (nn.Dense, nn.DenseGeneral, nn.Einsum)):
                kernel = context.module.variables["params"]["kernel"]
                units = kernel.shape[-1] if isinstance(context.module, nn.Dense) else \
                    int(np.prod(out.shape[2:]))
                seen["/".join(context.module.path)] = np.asarray(out, np.float64).reshape(
                    -1, units)
            return out

        with nn.intercept_methods(interceptor):
            model.apply({"params": variables}, inputs)
        return seen
    x = np.asarray(inputs, np.float64).reshape(len(inputs), -1)
    z1 = x @ np.asarray(variables["w1"], np.float64) + np.asarray(variables["b1"])
    z2 = np.maximum(z1, 0) @ np.asarray(variables["w2"], np.float64) + np.asarray(variables["b2"])
    return {"w1": z1, "w2": z2}


def _flags(model):
    return {f: True for f in ("use_running_average", "deterministic")
            if any(hasattr(m, f) for _, m in nnx.iter_modules(model))}


def _quantity(name, model, layer, program, z):
    if program == "linear":
        return z
    if name == "nnx_cnn" and layer in ("conv1", "conv2"):
        bn = getattr(model, "bn" + layer[-1])
        a = np.asarray(bn.scale[...], np.float64) / np.sqrt(np.asarray(bn.var[...]) + bn.epsilon)
        return np.maximum(a * (z - np.asarray(bn.mean[...])) + np.asarray(bn.bias[...]), 0)
    return np.maximum(z, 0)


def _pruned_model(model, network):
    return network.module if isinstance(model, nnx.Module) else model


_QUICK = {("nnx_mlp", "parallel"), ("function", "cascade")}


@pytest.mark.parametrize("name, scheme", [
    pytest.param(n, s, marks=() if (n, s) in _QUICK else pytest.mark.slow)
    for n in MODELS for s in ("parallel", "cascade")])
def test_nettrim_prunes_every_map_with_independently_checked_certificates(name, scheme,
                                                                        request):
    model, variables, inputs, layers, _, programs = _setup(name, request,
                                                           (name, scheme) in _QUICK)
    network = nettrim.prune_network(model, variables, inputs, epsilon=0.3, scheme=scheme,
                                    heldout=0, max_rows=10 ** 6, progress=False)
    assert list(network.layers) == layers
    original = _capture(name, model, variables, inputs)
    pruned_model = _pruned_model(model, network)
    whole = _capture(name, pruned_model, network.params, inputs)
    kept = 0
    for layer in layers:
        report = network.layers[layer]
        if scheme == "parallel":  # the layer alone pruned, the others trained
            alone = _alone(model, variables, network, layer)
            z = _capture(name, alone, None if isinstance(model, nnx.Module) else
                         _alone_params(variables, network, layer), inputs)[layer]
        else:
            z = whole[layer]
        program = programs[layer]
        new = _quantity(name, model, layer, program, z)
        old = _quantity(name, model, layer, program, original[layer])
        measured = np.linalg.norm(new - old) / np.linalg.norm(old)
        assert report.program == program
        assert measured == pytest.approx(report.measured, rel=1e-3, abs=1e-6)
        assert measured <= report.epsilon_certified * (1 + 1e-5) + 1e-6, layer
        kept += report.kept_weights
    assert kept < sum(network.layers[n].weights for n in layers)  # something was pruned
    assert type(network.params) is type(_params(model, variables))


def _alone_params(variables, network, layer):
    """Trained params with one layer's kernel and bias (``w1`` → ``b1`` in the function) pruned."""
    return jax.tree_util.tree_map_with_path(
        lambda p, old, new: new if path_string(p).startswith(layer + "/") or
        path_string(p) in (layer, "b" + layer[1:]) else old, variables, network.params)


def _alone(model, variables, network, layer):
    if not isinstance(model, nnx.Module):
        return model
    state = jax.tree_util.tree_map_with_path(
        lambda p, old, new: new if path_string(p).startswith(layer + "/") else old,
        nnx.state(model, nnx.Param), network.params)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, state, rest)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "decoder" else
                                               pytest.mark.slow) for n in MODELS])
@pytest.mark.parametrize("solver", ["sparsegpt", "wanda", "magnitude"])
def test_peers_at_half_and_two_four(name, solver, request):
    model, variables, inputs, layers, _, _ = _setup(name, request, name == "decoder")
    layer_solver = getattr(peers, f"{solver}_layer")
    half = nettrim.prune_network(model, variables, inputs, kept_fraction=0.5, solver=layer_solver,
                                 heldout=0, progress=False)
    found = inspect_model(model, variables, inputs[:2])
    for lmap in found.maps:
        matrix = lmap.matrix(half.params)
        if solver == "wanda":  # each output unit keeps round(N/2) of its N inputs
            per_unit = np.count_nonzero(matrix, axis=0)
            assert np.all(np.abs(per_unit - matrix.shape[0] / 2) <= 0.5), lmap.name
        else:  # the layer keeps round(size/2)
            assert abs(np.count_nonzero(matrix) - matrix.size / 2) <= 1, lmap.name
    # 2:4 groups 4 consecutive inputs: maps whose input count is a multiple of 4 (a 3x3x1 conv
    # has 9 and is refused with a clear error)
    fits = [m.name for m in found.maps if m.num_inputs % 4 == 0]
    two_four = nettrim.prune_network(model, variables, inputs, kept_fraction=0.5, nm=(2, 4),
                                     solver=layer_solver, heldout=0, progress=False, layers=fits)
    for lmap in found.maps:
        if lmap.name in fits:
            groups = lmap.matrix(two_four.params)
            per_group = (groups.reshape(-1, 4, groups.shape[1]) != 0).sum(axis=1)
            assert per_group.max() <= 2, lmap.name
    if len(fits) < len(found.maps):
        with pytest.raises(ValueError, match="not a multiple of M = 4"):
            nettrim.prune_network(model, variables, inputs, kept_fraction=0.5, nm=(2, 4),
                                  solver=layer_solver, heldout=0, progress=False)


# (producer, consumer, width, dead units (zero kernel columns, a bias of 0.2 kept: a non-zero
# constant carried on), units the consumer no longer reads)
_COMPACT = {
    "nnx_mlp": ("hidden", "out", 24, range(0, 8), (10, 11)),
    "nnx_cnn": ("linear1", "linear2", 16, range(0, 5), (6,)),
    "nnx_vit": ("blocks/0/fc1", "blocks/0/fc2", 32, range(0, 10), (12, 13)),
    "linen_vit": ("fc1", "fc2", 32, range(0, 10), (12, 13)),
    "decoder": ("mlp_in", "mlp_out", 32, range(0, 10), (12, 13)),
    "function": ("w1", "w2", 24, range(0, 8), (10, 11)),
}


def _with_units_killed(name, model, variables):
    """The model's params with whole producer columns zeroed (their bias set to 0.2) and
    consumer rows zeroed, as structured pruning leaves them; (model, variables) back."""
    producer, consumer, _, dead, unread = _COMPACT[name]
    params = jax.tree.map(np.array, _params(model, variables))

    def edit(path, leaf):
        key = path_string(path)
        if key in (f"{producer}/kernel", producer):
            leaf[..., list(dead)] = 0
        elif key in (f"{producer}/bias", "b" + producer[1:]):
            leaf[list(dead)] = 0.2
        elif key in (f"{consumer}/kernel", consumer):
            leaf[list(unread)] = 0
        return leaf

    params = jax.tree_util.tree_map_with_path(edit, params)
    if isinstance(model, nnx.Module):
        model = nnx.merge(*nnx.split(model, nnx.Param, ...)[:1], params,
                          nnx.split(model, nnx.Param, ...)[2])
        return model, None
    return model, params


def _outputs(model, variables, inputs):
    if isinstance(model, nnx.Module):
        return nnx.view(model, **_flags(model))(inputs) if _flags(model) else model(inputs)
    if isinstance(model, nn.Module):
        return model.apply({"params": variables}, inputs)
    return model(variables, inputs)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in ("function",)
                                               else pytest.mark.slow) for n in MODELS])
def test_compaction_removes_dead_and_unread_units_with_equal_outputs(name, tmp_path, request):
    from hoyertrim import compact as compact_lib
    model, variables, inputs, _, _, _ = _setup(name, request, name in ("nnx_vit", "function"))
    model, variables = _with_units_killed(name, model, variables)
    producer, consumer, width, dead, unread = _COMPACT[name]
    compacted = compact_lib.compact(model, variables, inputs[:1])
    expected = _outputs(model, variables, inputs)
    np.testing.assert_allclose(compacted.apply(inputs), expected, rtol=1e-5, atol=1e-5)
    kept = compacted.layers[producer].output_index
    assert len(kept) == width - len(dead) - len(unread)
    assert not set(kept.tolist()) & (set(dead) | set(unread))
    assert compacted.layers[consumer].shift is not None  # the dead units' gelu/relu(0.2)
    loaded = compact_lib.load_compact(compact_lib.save_compact(tmp_path / "c", compacted),
                                      model, None if isinstance(model, nnx.Module) else
                                      variables)
    np.testing.assert_allclose(loaded.apply(inputs), expected, rtol=1e-5, atol=1e-5)


def test_unit_groupings_are_each_maps_units_as_kernel_axes():
    """Dense and conv kernels: DeepHoyer's default groupings (a 1-channel conv's input unit is
    its single channel, not a window axis); attention: q/k/v grouped by head and input feature,
    the output projection by output feature and head."""
    from hoyertrim.inspection import unit_groupings
    from hoyertrim.models import TransformerBlock, create_model
    tokens = jnp.ones((1, 5, 16))
    block = TransformerBlock(heads=4, mlp=32)
    found = inspect_model(block, block.init(jax.random.PRNGKey(0), tokens), tokens)
    groupings = unit_groupings(found.maps)
    for name in ("attn/query", "attn/key", "attn/value"):  # kernel (D, heads, head dim)
        assert groupings[name] == ((0, 2), (1, 2))
    assert groupings["attn/out"] == ((0, 1), (1, 2))  # kernel (heads, head dim, D)
    assert groupings["mlp_in"] == penalties.default_groupings(2)
    lenet = create_model("lenet5")
    images = jnp.ones((1, 28, 28, 1))
    groupings = unit_groupings(inspect_model(lenet, lenet.init(jax.random.PRNGKey(0), images),
                                             images).maps)
    assert groupings == {name: penalties.default_groupings(4 if name.startswith("conv") else 2)
                         for name in ("conv0", "conv1", "dense0", "dense1")}


def test_coupled_groups_are_a_resnets_stream_channels_and_nothing_else():
    """ResNet-20: each channel of the residual stream is written by the stem or a stage's
    padded shortcut and every block's second conv — one group across the stages, channel c of
    stage 1 becoming c + 8 of stage 2 and c + 24 of stage 3 (option-A zero padding); the blocks'
    inner channels are alone. A transformer's stream meets LayerNorm (every feature mixed):
    nothing is removable together. LeNet-5 has no coupling."""
    from hoyertrim.models import TransformerBlock, create_model
    model = create_model("resnet20", input_shape=(12, 12, 1))
    images = jnp.ones((1, 12, 12, 1))
    groups = inspect_model(model, model.init(jax.random.PRNGKey(0), images), images).coupled
    assert len(groups) == 64  # the stage-3 stream's 64 channels
    stem = [g for g in groups if ("Conv_0", 5) in g.members]
    assert len(stem) == 1 and stem[0].members == (
        ("Conv_0", 5), *((f"_ResidualBlock_{b}/Conv_1", 5) for b in range(3)),
        *((f"_ResidualBlock_{b}/Conv_1", 13) for b in range(3, 6)),
        *((f"_ResidualBlock_{b}/Conv_1", 29) for b in range(6, 9)))
    assert all(not name.endswith("Conv_0") or name == "Conv_0"
               for g in groups for name, _ in g.members)
    block = TransformerBlock(heads=4, mlp=32)
    tokens = jnp.ones((1, 5, 16))
    assert inspect_model(block, block.init(jax.random.PRNGKey(0), tokens), tokens).coupled == []
