"""Compaction: fewer units, same outputs (up to float rounding), on zoo and user-style models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import user_models as um
from hoyertrim import compact as compact_lib
from hoyertrim.inspection.program import Program
from hoyertrim.models import LeNet5, MLP


def _kill(params, layer, outputs=(), inputs=(), bias=None):
    """Zero whole output columns / input rows of a layer's kernel (as structured pruning does)."""
    params = jax.tree.map(np.array, params)
    kernel = params[layer]["kernel"]
    kernel[..., list(outputs)] = 0
    if inputs:
        kernel[..., list(inputs), :] = 0
    if bias is not None:
        params[layer]["bias"][list(outputs)] = bias
    return params


def _check(model, variables, images, kwargs=None, fewer_than=None):
    compacted = compact_lib.compact(model, variables, images[:1], apply_kwargs=kwargs)
    full = variables if "params" in variables else {"params": variables}
    expected = model.apply(full, images, **(kwargs or {}))
    np.testing.assert_allclose(compacted.apply(images), expected, rtol=1e-5, atol=1e-5)
    if fewer_than is not None:
        assert compacted.weights() < fewer_than
    return compacted


@pytest.mark.slow  # seconds, not milliseconds: keeps the quick tier under 90 s
def test_mlp_dead_units_are_removed_and_their_constants_carried():
    model = MLP(hidden=(20, 12), num_classes=4, input_shape=(6, 6, 1))
    images = jax.random.uniform(jax.random.PRNGKey(1), (64, 6, 6, 1))
    params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
    # dense0: units 0-4 dead with positive bias (constant relu(b) > 0 feeds dense1), 5-6 dead
    # with negative bias (constant 0); pixels 0-9 unread; dense1 no longer reads unit 7.
    params = _kill(params, "dense0", outputs=range(5), inputs=range(10), bias=0.3)
    params = _kill(params, "dense0", outputs=(5, 6), bias=-0.2)
    params = jax.tree.map(np.array, params)
    params["dense1"]["kernel"][7] = 0
    compacted = _check(model, params, images, fewer_than=36 * 20 + 20 * 12 + 12 * 4)
    layer0 = compacted.layers["dense0"]
    assert layer0.kernel.shape == (26, 12)  # 36 - 10 pixels, 20 - 8 units
    assert compacted.layers["dense1"].kernel.shape == (12, 12)
    assert compacted.layers["dense2"].kernel.shape == (12, 4)  # logits stay


@pytest.mark.slow
def test_cnn_with_valid_convs_and_pooling():
    model = um.ValidCNN()
    images = jax.random.uniform(jax.random.PRNGKey(1), (32, 8, 8, 1))
    params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
    params = _kill(params, "Conv_0", outputs=(0, 3), bias=0.5)   # constants into Conv_1 (VALID)
    params = _kill(params, "Conv_1", outputs=(1, 2, 5), bias=0.1)  # constants into Dense, via flatten
    compacted = _check(model, params, images)
    assert compacted.layers["Conv_0"].kernel.shape[-1] == 6
    assert compacted.layers["Conv_1"].kernel.shape[-2:] == (6, 13)
    assert compacted.layers["Conv_1"].shift is not None  # Conv_0's constants, through every tap
    assert compacted.layers["Dense_0"].kernel.shape[0] == 13  # 1x1 positions after Conv_1


@pytest.mark.slow
def test_batchnorm_between_layers_runs_narrow_and_same_padding_gets_constants_per_position(
        tmp_path):
    model = um.ConvBatchNormCNN(widths=(6, 8), hidden=16)
    images = jax.random.uniform(jax.random.PRNGKey(1), (16, 8, 8, 1))
    variables = model.init(jax.random.PRNGKey(0), images[:1], train=False)
    variables = jax.tree.map(np.array, variables)
    params = variables["params"]
    params["Conv_0"]["kernel"][..., [0, 1, 2]] = 0
    params["BatchNorm_0"]["bias"][[0, 1]] = -1.0   # relu(-1) = 0: removable before a SAME conv
    params["BatchNorm_0"]["bias"][2] = 0.7         # a nonzero constant before SAME padding
    variables["batch_stats"]["BatchNorm_0"]["mean"] += 0.1
    compacted = _check(model, variables, images, {"train": False})
    # Conv_0's units 0-2 are not computed; 0 and 1 are 0 after BatchNorm and ReLU and go; SAME
    # padding sees unit 2's constant as 0 at the borders, so what it adds to Conv_1's output
    # differs by position: one (H, W, filters) shift, not an input.
    assert list(compacted.layers["Conv_0"].output_index) == [3, 4, 5]
    assert list(compacted.layers["Conv_1"].input_index) == [3, 4, 5]
    shift = compacted.layers["Conv_1"].shift
    assert shift.shape == (4, 4, 8) and not np.allclose(shift[0, 0], shift[2, 2])
    loaded = compact_lib.load_compact(compact_lib.save_compact(tmp_path / "c", compacted), model)
    np.testing.assert_allclose(loaded.apply(images), compacted.apply(images), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.slow
def test_lenet5_group_sparse_filters():
    model = LeNet5()
    images = jax.random.uniform(jax.random.PRNGKey(1), (8, 28, 28, 1))
    params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
    params = _kill(params, "conv0", outputs=range(12), bias=0.05)
    params = _kill(params, "conv1", outputs=range(36), inputs=range(12, 14))
    params = _kill(params, "dense0", outputs=range(400), bias=-0.1)
    compacted = _check(model, params, images, fewer_than=431080 // 10)
    # conv0: 12 dead filters, and 12-13 no longer read by conv1; dense0: 14 filters × 4×4
    # (PatchConv's kernels as its contraction reads them: (window · channels, filters))
    assert compacted.layers["conv0"].kernel.shape == (25, 6)
    assert compacted.layers["conv1"].kernel.shape == (25 * 6, 14)
    assert compacted.layers["dense0"].kernel.shape == (14 * 16, 100)


@pytest.mark.slow
def test_dead_units_feeding_a_residual_add_are_filled_back_in():
    model = um.ResidualMLP()
    images = jax.random.uniform(jax.random.PRNGKey(1), (16, 6, 6, 1))
    params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
    params = _kill(params, "Dense_0", outputs=(0, 1), bias=0.2)  # feeds Dense_1 and the skip
    compacted = _check(model, params, images)
    assert compacted.layers["Dense_0"].kernel.shape[-1] == 22


@pytest.mark.slow
def test_compact_model_saves_smaller_and_loads_to_the_same_outputs(tmp_path):
    model = MLP(hidden=(64, 32), num_classes=4, input_shape=(8, 8, 1))
    images = jax.random.uniform(jax.random.PRNGKey(1), (32, 8, 8, 1))
    params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
    params = _kill(params, "dense0", outputs=range(40), bias=0.1)
    params = jax.tree.map(np.array, params)
    params["dense1"]["kernel"][np.abs(params["dense1"]["kernel"]) < 0.15] = 0  # unstructured
    compacted = compact_lib.compact(model, params, images[:1])
    path = compact_lib.save_compact(tmp_path / "compact", compacted)
    dense_bytes = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(params))
    assert (path / "compact.npz").stat().st_size < dense_bytes / 2
    loaded = compact_lib.load_compact(path, model)
    np.testing.assert_allclose(loaded.apply(images), model.apply({"params": params}, images),
                               rtol=1e-5, atol=1e-5)
    (path / "compact.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="damaged"):
        compact_lib.load_compact(path, model)
    with pytest.raises(FileNotFoundError, match="No compact model"):
        compact_lib.load_compact(tmp_path / "nothing", model)


class _MixingMLP(nn.Module):
    """A parameter-free op mixes units after the ReLU: feature u reads units u and 11 - u."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(12)(x.reshape((x.shape[0], -1))))
        x = x + x[:, ::-1]
        return nn.Dense(4)(x)


def test_units_mixed_before_their_consumer_are_computed_or_filled_in():
    model = _MixingMLP()
    images = jax.random.uniform(jax.random.PRNGKey(1), (16, 6, 6, 1))
    params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
    params = _kill(params, "Dense_0", outputs=(0, 1), bias=0.3)  # constant, but mixed with 11, 10
    compacted = _check(model, params, images)
    assert compacted.layers["Dense_0"].kernel.shape[-1] == 10  # the dead units' constants
    assert compacted.layers["Dense_1"].input_index is None     # are filled back in

def _conv_op(module, x):
    variables = module.init(jax.random.PRNGKey(0), x)
    program = Program(jax.make_jaxpr(lambda v, x: module.apply(v, x))(variables, x))
    return next(op for op in program.ops if op.name == "conv_general_dilated")


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
@pytest.mark.parametrize("cin, cout, kernel_size, shape", [
    (1, 7, (5, 5), (28, 28)), (3, 4, (3, 3), (9, 13)), (8, 2, (1, 4), (6, 7)), (2, 5, (4, 2), (5, 5))])
def test_small_channel_conv_as_row_matmul_equals_xla_conv(padding, cin, cout, kernel_size,
                                                          shape):
    from hoyertrim.compact.engine import _conv_as_row_matmul, _row_matmul_applies
    rng = np.random.default_rng(cin + cout)
    module = nn.Conv(cout, kernel_size, padding=padding, use_bias=False)
    x = jnp.asarray(rng.normal(size=(3, *shape, cin)), jnp.float32)
    kernel = rng.normal(size=(*kernel_size, cin, cout)).astype(np.float32)
    expected = module.apply({"params": {"kernel": kernel}}, x)
    op = _conv_op(module, x)
    assert _row_matmul_applies(op, kernel, x)
    np.testing.assert_allclose(_conv_as_row_matmul(op, kernel, x), expected, rtol=1e-5,
                               atol=1e-5)


def test_row_matmul_is_only_used_where_it_is_exact():
    from hoyertrim.compact.engine import _row_matmul_applies
    x = jnp.zeros((1, 8, 8, 2))
    kernel = np.zeros((3, 3, 2, 4), np.float32)
    for module in (nn.Conv(4, (3, 3), strides=2), nn.Conv(4, (3, 3), kernel_dilation=2),
                   nn.Conv(4, (3, 3), feature_group_count=2)):
        assert not _row_matmul_applies(_conv_op(module, x), kernel, x)
    wide = jnp.zeros((1, 8, 8, 9))
    assert not _row_matmul_applies(_conv_op(nn.Conv(4, (3, 3)), wide), np.zeros((3, 3, 9, 4)),
                                   wide)  # many input channels: XLA's conv


def _resnet_with_coupled_dead_channels(zero, positive):
    """ResNet-20 (12×12 inputs) with random BatchNorm statistics, whose stage-1 residual channels
    ``zero`` and ``positive`` are dead in every member of their group: the stem conv's output
    and every stage-1 block's second conv write nothing to them. Their BatchNorm shifts make
    the stream's constant 0 (``zero``, relu of a negative shift) or positive (``positive``)."""
    from hoyertrim.models import CifarResNet
    model = CifarResNet(blocks_per_stage=3, input_shape=(12, 12, 1))
    images = jax.random.uniform(jax.random.PRNGKey(1), (8, 12, 12, 1))
    variables = jax.tree.map(np.array, model.init(jax.random.PRNGKey(0), images[:1]))
    rng = np.random.default_rng(0)
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables[collection]):
            name = jax.tree_util.keystr(path)
            if "BatchNorm" in name:
                leaf[...] = {"'scale'": rng.uniform(0.5, 1.5, leaf.shape),
                             "'bias'": rng.normal(0, 0.3, leaf.shape),
                             "'mean'": rng.normal(0, 0.3, leaf.shape),
                             "'var'": rng.uniform(0.5, 1.5, leaf.shape)}[name[name.rindex("["):]
                                                                        .strip("[]")]
    params, stats = variables["params"], variables["batch_stats"]
    members = [("Conv_0", "BatchNorm_0")] + [
        (f"_ResidualBlock_{b}/Conv_1", f"_ResidualBlock_{b}/BatchNorm_1") for b in range(3)]
    for conv, norm in members:
        node_p, node_s = params, stats
        for part in conv.split("/")[:-1]:
            node_p, node_s = node_p[part], node_s[part]
        norm_p, norm_s = node_p[norm.split("/")[-1]], node_s[norm.split("/")[-1]]
        node_p[conv.split("/")[-1]]["kernel"][..., list(zero) + list(positive)] = 0
        norm_s["mean"][list(zero) + list(positive)] = 0.0
        norm_p["bias"][list(zero)] = -0.5
        norm_p["bias"][list(positive)] = 0.5
    return model, variables, images


@pytest.mark.slow
def test_resnet_channels_coupled_across_residual_adds_go_when_dead_in_every_member():
    model, variables, images = _resnet_with_coupled_dead_channels(zero=(3, 7), positive=(5,))
    compacted = _check(model, variables, images, {"train": False})
    layers = compacted.layers
    assert layers["Conv_0"].kernel.shape[-1] == 13       # the stem writes 16 - 3 channels
    for block in range(3):
        # the group's members compute 13 channels and the next convs read 13: the positive
        # constant enters them as a per-position shift (SAME padding sees 0 at the borders)
        assert layers[f"_ResidualBlock_{block}/Conv_1"].kernel.shape[-1] == 13
        assert layers[f"_ResidualBlock_{block}/Conv_0"].kernel.shape[-2] == 13
        assert layers[f"_ResidualBlock_{block}/Conv_0"].shift.shape == (12, 12, 16)
    # stage 2's first block reads the stream too (its option-A shortcut pads the narrow value)
    assert layers["_ResidualBlock_3/Conv_0"].kernel.shape[-2] == 13


@pytest.mark.slow
def test_a_channel_alive_in_one_member_of_its_group_stays():
    model, variables, images = _resnet_with_coupled_dead_channels(zero=(3,), positive=())
    # Block 1's second conv writes channel 3 again: the group is not dead everywhere.
    kernel = variables["params"]["_ResidualBlock_1"]["Conv_1"]["kernel"]
    kernel[..., 3] = np.random.default_rng(1).normal(0, 0.1, kernel.shape[:-1])
    compacted = _check(model, variables, images, {"train": False})
    assert compacted.layers["_ResidualBlock_1/Conv_1"].kernel.shape[-1] == 16
    assert compacted.layers["_ResidualBlock_2/Conv_0"].kernel.shape[-2] == 16
    assert compacted.layers["_ResidualBlock_0/Conv_0"].kernel.shape[-2] == 15
    assert compacted.layers["_ResidualBlock_1/Conv_1"].output_index is None


# -- attention heads: q/k/v/out of one head are one group ---------------------------------------

def _vit_block_with_dead_heads(causal: bool):
    from hoyertrim.models import TransformerBlock
    model = TransformerBlock(heads=4, mlp=32, causal=causal)
    tokens = jax.random.normal(jax.random.PRNGKey(1), (6, 5, 16))
    params = jax.tree.map(np.array, model.init(jax.random.PRNGKey(0), tokens[:1])["params"])
    params["attn"]["out"]["kernel"][[1, 3]] = 0  # heads 1 and 3 are read by no one
    params["mlp_in"]["kernel"][:, [0, 5, 7]] = 0  # three dead MLP hidden units
    params["mlp_in"]["bias"][[0, 5, 7]] = 0.3  # ... whose constant gelu(0.3) is carried
    return model, params, tokens


@pytest.mark.parametrize("causal", [False, True])
def test_vit_block_dead_heads_leave_q_k_v_and_out_with_the_mlp_units(causal):
    model, params, tokens = _vit_block_with_dead_heads(causal)
    compacted = _check(model, params, tokens)
    layers = compacted.layers
    for name in ("attn/query", "attn/key", "attn/value"):
        assert layers[name].kernel.shape == (16, 2, 4)  # (D, heads kept, head dim)
        np.testing.assert_array_equal(layers[name].heads, [0, 2])
    assert layers["attn/out"].kernel.shape == (2, 4, 16)
    assert layers["mlp_in"].kernel.shape == (16, 29) and layers["mlp_out"].kernel.shape == (29, 16)


def test_compact_heads_save_and_load(tmp_path):
    model, params, tokens = _vit_block_with_dead_heads(causal=False)
    compacted = compact_lib.compact(model, params, tokens[:1])
    loaded = compact_lib.load_compact(compact_lib.save_compact(tmp_path / "c", compacted), model)
    np.testing.assert_array_equal(loaded.layers["attn/value"].heads, [0, 2])
    np.testing.assert_allclose(loaded.apply(tokens), model.apply({"params": params}, tokens),
                               rtol=1e-5, atol=1e-5)


def test_a_head_read_outside_the_output_projection_stays():
    """Head 0's output kernel slab is zero, but its queries are also summed into the output:
    removing the head would change the result, so every head is kept."""

    def apply(params, x):
        q = jnp.einsum("bld,dhk->blhk", x, params["query"])
        return jnp.einsum("blhk,hkd->bld", q, params["out"]) + q.sum(axis=(2, 3))[..., None]

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"query": np.array(jax.random.normal(keys[0], (8, 3, 4))),
              "out": np.array(jax.random.normal(keys[1], (3, 4, 8)))}
    params["out"][0] = 0
    x = jax.random.normal(keys[2], (2, 5, 8))
    compacted = compact_lib.compact(apply, params, x[:1])
    np.testing.assert_allclose(compacted.apply(x), apply(params, x), rtol=1e-5, atol=1e-5)
    assert all(layer.heads is None for layer in compacted.layers.values())
    assert compacted.layers["query"].kernel.shape == (8, 3, 4)


def test_nnx_attention_heads_are_removed_too():
    from flax import nnx
    attention = nnx.MultiHeadAttention(num_heads=4, in_features=16, qkv_features=16,
                                       decode=False, rngs=nnx.Rngs(0))
    attention.out.kernel.value = attention.out.kernel.value.at[2].set(0.0)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 16))
    expected = attention(x)
    compacted = compact_lib.compact(attention, None, x[:1])
    np.testing.assert_allclose(compacted.apply(x), expected, rtol=1e-5, atol=1e-5)
    kept = [layer.heads for layer in compacted.layers.values() if layer.heads is not None]
    assert len(kept) == 4 and all(np.array_equal(k, [0, 1, 3]) for k in kept)


def test_attention_projections_gather_only_the_features_they_read():
    """No head is dead, but q/k/v read only half the features (and heads 1 and 3 are dead in
    another variant): the projections gather what they read, with equal outputs."""
    model, params, tokens = _vit_block_with_dead_heads(causal=False)
    params["attn"]["out"]["kernel"][[1, 3]] = 1.0  # every head read again
    for name in ("query", "key", "value"):
        params["attn"][name]["kernel"][::2] = 0.0  # features 0, 2, 4, … read by no projection
    compacted = _check(model, params, tokens)
    for name in ("attn/query", "attn/key", "attn/value"):
        assert compacted.layers[name].kernel.shape == (8, 4, 4)
        np.testing.assert_array_equal(compacted.layers[name].input_index, np.arange(1, 16, 2))
    params["attn"]["out"]["kernel"][[1, 3]] = 0.0  # and with dead heads: both at once
    compacted = _check(model, params, tokens)
    assert compacted.layers["attn/value"].kernel.shape == (8, 2, 4)


def _kernel(params, layer: str) -> np.ndarray:
    node = params
    for key in layer.split("/"):
        node = node[key]
    return node["kernel"]


@pytest.mark.slow
def test_a_coupled_group_masked_in_every_writer_is_compacted_away():
    """The coupled groups found from the computation, masked below a fraction of the largest
    group's norm (the `prune --rule group` step), leave a ResNet whose stream channel compaction
    removes from every member in every stage — equal outputs."""
    from hoyertrim.inspection import inspect_model, output_axes, unit_groupings
    from hoyertrim.masks import apply_masks, coupled_group_masks
    model, variables, images = _resnet_with_coupled_dead_channels(zero=(), positive=())
    found = inspect_model(model, variables, images[:1])
    (group,) = [g for g in found.coupled if ("Conv_0", 3) in g.members]
    params = jax.tree.map(np.array, variables["params"])
    for layer, unit in group.members:  # one weak coupled group, across the three stages
        _kernel(params, layer)[..., unit] *= 1e-3
    masks = coupled_group_masks(params, found.coupled, output_axes(unit_groupings(found.maps)),
                                fraction_of_max=0.05)
    pruned = {**variables, "params": jax.tree.map(np.asarray, apply_masks(params, masks))}
    assert sum(int(np.sum(~np.asarray(m))) for m in jax.tree.leaves(masks)) == sum(
        _kernel(params, layer)[..., unit].size for layer, unit in group.members)
    compacted = _check(model, pruned, images)
    for layer, unit in group.members:
        assert compacted.layers[layer].kernel.shape[-1] == _kernel(params, layer).shape[-1] - 1
