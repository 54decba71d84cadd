"""Models written the way Flax teaches in 2026: NNX first, transformers, and a plain JAX function.

Nothing here knows about hoyertrim; the tests prune these as a user would bring them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class NnxMLP(nnx.Module):
    def __init__(self, din: int = 36, hidden: int = 24, dout: int = 10, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(din, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.out(nnx.relu(self.hidden(x)))


class NnxCNN(nnx.Module):
    """Conv → BatchNorm → ReLU → pool, twice, then two Linear layers (Flax's NNX MNIST style)."""

    def __init__(self, channels: int = 1, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(channels, 4, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, rngs=rngs)
        self.conv2 = nnx.Conv(4, 8, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(8, rngs=rngs)
        self.linear1 = nnx.Linear(8 * 2 * 2, 16, rngs=rngs)
        self.linear2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.bn1(self.conv1(x))), (2, 2), (2, 2))
        x = nnx.avg_pool(nnx.relu(self.bn2(self.conv2(x))), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        return self.linear2(nnx.relu(self.linear1(x)))


def _patchify(x, patch: int):
    b, h, w, c = x.shape
    x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class NnxEncoderBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class NnxViT(nnx.Module):
    """Patch embedding, pre-LayerNorm encoder blocks, mean-pooled classifier head."""

    def __init__(self, image: int = 8, patch: int = 4, dim: int = 16, heads: int = 2,
                 depth: int = 1, *, rngs: nnx.Rngs):
        self.patch = patch
        self.embed = nnx.Linear(patch * patch, dim, rngs=rngs)
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(),
                                                           ((image // patch) ** 2, dim)))
        self.blocks = nnx.List([NnxEncoderBlock(dim, heads, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, 10, rngs=rngs)

    def __call__(self, x):
        x = self.embed(_patchify(x, self.patch)) + self.position[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(axis=1))


class LinenViT(nn.Module):
    """A linen ViT encoder: MultiHeadDotProductAttention (DenseGeneral q/k/v/out) and a gelu MLP."""

    patch: int = 4
    dim: int = 16
    heads: int = 2

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.dim, name="embed")(_patchify(x, self.patch))
        y = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads, name="attn")(y, y)
        y = nn.LayerNorm()(x)
        x = x + nn.Dense(self.dim, name="fc2")(nn.gelu(nn.Dense(2 * self.dim, name="fc1")(y)))
        return nn.Dense(10, name="head")(nn.LayerNorm()(x).mean(axis=1))


class LinenDecoderBlock(nn.Module):
    """A decoder block with causal attention written with Einsum (q/k/v) and DenseGeneral (out),
    on embedded tokens; the LM head is a Dense layer (no weight tying)."""

    vocab: int = 32
    dim: int = 16
    heads: int = 2

    @nn.compact
    def __call__(self, tokens):
        head_dim = self.dim // self.heads
        x = nn.Embed(self.vocab, self.dim, name="embed")(tokens)
        y = nn.LayerNorm()(x)
        q = nn.Einsum((self.dim, self.heads, head_dim), "btd,dhk->bthk", use_bias=False,
                      name="query")(y)
        k = nn.Einsum((self.dim, self.heads, head_dim), "btd,dhk->bthk", use_bias=False,
                      name="key")(y)
        v = nn.Einsum((self.dim, self.heads, head_dim), "btd,dhk->bthk", use_bias=False,
                      name="value")(y)
        mask = nn.make_causal_mask(tokens)
        attended = nn.dot_product_attention(q, k, v, mask=mask)
        x = x + nn.DenseGeneral(self.dim, axis=(-2, -1), name="out")(attended)
        y = nn.LayerNorm()(x)
        x = x + nn.Dense(self.dim, name="mlp_out")(nn.gelu(nn.Dense(2 * self.dim,
                                                                      name="mlp_in")(y)))
        return nn.Dense(self.vocab, name="lm_head")(nn.LayerNorm()(x))


def mlp_function(params, x):
    """A plain JAX MLP: ``params = {"w1", "b1", "w2", "b2"}``."""
    x = x.reshape(x.shape[0], -1)
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def mlp_function_params(key, din: int = 36, hidden: int = 24, dout: int = 10):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (din, hidden)) / jnp.sqrt(din), "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, dout)) / jnp.sqrt(hidden),
            "b2": jnp.zeros(dout)}
