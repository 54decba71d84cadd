import jax
import jax.numpy as jnp
import pytest

from hoyertrim.models import MODELS, count_params, create_model


@pytest.mark.parametrize("name, expected", [
    ("lenet300100", 266_610),   # Han et al. 2015
    ("lenet5", 431_080),        # Caffe LeNet-5
    ("nettrim_fc", 784 * 300 + 300 + 300 * 1000 + 1000 + 1000 * 100 + 100 + 100 * 10 + 10),
    pytest.param("resnet20", 269_722, marks=pytest.mark.slow),  # He et al. 2016: 0.27M
    pytest.param("resnet56", 853_018, marks=pytest.mark.slow),  # 0.85M
])
def test_parameter_counts_match_literature(name, expected):
    model = create_model(name)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *model.input_shape)))
    assert count_params(variables["params"]) == expected


@pytest.mark.parametrize("name", [pytest.param(m, marks=pytest.mark.slow) if "resnet" in m or m == "vit" else m
                                  for m in MODELS if m != "gpt"])
def test_logits_shape(name):
    model = create_model(name)
    x = jnp.ones((3, *model.input_shape))
    variables = model.init(jax.random.PRNGKey(0), x)
    assert model.apply(variables, x).shape == (3, 10)


@pytest.mark.parametrize("name, bad_shape", [
    ("lenet300100", (4, 28, 28)),       # missing channel axis
    ("lenet5", (28, 28, 1)),            # missing batch axis
    ("lenet5", (4, 32, 32, 3)),         # CIFAR images into an MNIST model
    ("resnet20", (4, 28, 28, 1)),
])
def test_wrong_image_shape_is_a_clear_error(name, bad_shape):
    model = create_model(name)
    with pytest.raises(ValueError, match="expects a batch of images of shape"):
        model.init(jax.random.PRNGKey(0), jnp.zeros(bad_shape))


@pytest.mark.slow
def test_resnet_batch_stats_update_in_train_and_freeze_in_eval():
    model = create_model("resnet20")
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3)) * 3 + 1
    variables = model.init(jax.random.PRNGKey(0), x)
    _, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updated["batch_stats"])
    assert any(not jnp.allclose(a, b) for a, b in zip(before, after))
    # Eval mode uses running averages: the output of one example doesn't depend on the batch.
    single = model.apply(variables, x[:1], train=False)
    batched = model.apply(variables, x, train=False)[:1]
    assert jnp.allclose(single, batched, atol=1e-5)


def test_dropout_is_active_only_in_training():
    model = create_model("lenet300100", dropout_rate=0.5)
    x = jnp.ones((2, 28, 28, 1))
    variables = model.init(jax.random.PRNGKey(0), x)
    assert jnp.array_equal(model.apply(variables, x), model.apply(variables, x))
    a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not jnp.allclose(a, b)


def test_unknown_model():
    with pytest.raises(ValueError, match="Unknown model"):
        create_model("vgg16")


def test_patch_conv_matches_flax_conv():
    from hoyertrim.models import PatchConv
    import flax.linen as nn
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 10, 3))
    conv = nn.Conv(7, (5, 3), padding="VALID")
    params = conv.init(jax.random.PRNGKey(1), x)
    patch = PatchConv(7, (5, 3))
    assert jax.tree.map(jnp.shape, patch.init(jax.random.PRNGKey(1), x)) == jax.tree.map(
        jnp.shape, params)
    params = jax.tree.map(lambda p: p + 0.1, params)  # nonzero bias too
    assert jnp.allclose(patch.apply(params, x), conv.apply(params, x), atol=1e-5)


def test_max_pool_2x2_matches_flax_max_pool_and_its_gradient_without_ties():
    from hoyertrim.models import max_pool_2x2
    import flax.linen as nn
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 6, 4))  # continuous: no ties
    def flax_pool(x):
        return nn.max_pool(x, (2, 2), strides=(2, 2))
    assert jnp.array_equal(max_pool_2x2(x), flax_pool(x))
    weights = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 3, 4))
    ours = jax.grad(lambda x: jnp.sum(weights * max_pool_2x2(x)))(x)
    theirs = jax.grad(lambda x: jnp.sum(weights * flax_pool(x)))(x)
    assert jnp.array_equal(ours, theirs)
    with pytest.raises(ValueError, match="even height and width"):
        max_pool_2x2(jnp.zeros((1, 5, 4, 1)))


@pytest.mark.slow  # seconds: keeps the quick tier under 90 s
def test_gpt_is_causal_and_predicts_every_next_byte():
    model = create_model("gpt", dim=32, heads=2, mlp=64, depth=1, context=16)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 256).astype(jnp.uint8)
    variables = model.init(jax.random.PRNGKey(0), tokens)
    logits = model.apply(variables, tokens)
    assert logits.shape == (2, 16, 256)
    changed = tokens.at[:, 10].set(tokens[:, 10] ^ 1)
    again = model.apply(variables, changed)
    # positions before the change see the same past; the changed one and later ones differ
    assert jnp.allclose(logits[:, :10], again[:, :10], atol=1e-6)
    assert not jnp.allclose(logits[:, 10:], again[:, 10:], atol=1e-3)
    with pytest.raises(ValueError, match="integer byte tokens"):
        model.apply(variables, jnp.zeros((2, 16)))
    with pytest.raises(ValueError, match="T ≤ 16"):
        model.apply(variables, jnp.zeros((2, 17), jnp.uint8))


@pytest.mark.slow  # seconds: keeps the quick tier under 90 s
def test_transformers_have_the_documented_sizes():
    vit, gpt = create_model("vit"), create_model("gpt")
    v = vit.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    g = gpt.init(jax.random.PRNGKey(0), jnp.zeros((1, 128), jnp.uint8))
    assert count_params(v["params"]) == 71_946
    assert count_params(g["params"]) == 478_976
