"""Flax linen models used in the pruning literature, and a registry to pick them by name.

All models take NHWC float images and return logits ``(batch, num_classes)``. Models with
BatchNorm keep running statistics in the ``batch_stats`` collection; call them with
``train=True`` and ``mutable=["batch_stats"]`` while training, ``train=False`` to evaluate.
Dropout, where configured, draws from the ``"dropout"`` PRNG stream when ``train=True``.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _check_input(x: jax.Array, expected: tuple[int, ...], model: str) -> None:
    """Raises a clear ValueError when ``x`` is not a batch of ``expected``-shaped images."""
    if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != tuple(expected):
        raise ValueError(
            f"{model} expects a batch of images of shape (batch, {', '.join(map(str, expected))}), "
            f"got an array of shape {tuple(x.shape)}. Add the batch axis and the channel axis "
            "(NHWC), e.g. images[None] or images[..., None]."
        )


def image_patches(x: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
    """VALID, stride-1 patches of NHWC images: (B, H, W, C) -> (B, H-kh+1, W-kw+1, kh*kw*C).

    The last axis is ordered (kh, kw, C), matching a Flax HWIO kernel reshaped to (kh*kw*C, O).
    """
    kh, kw = kernel_size
    out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    return jnp.concatenate(
        [x[:, i:i + out_h, j:j + out_w, :] for i in range(kh) for j in range(kw)], axis=-1)


class PatchConv(nn.Module):
    """A VALID, stride-1 convolution computed as patches @ kernel.

    Same parameters (``kernel`` (kh, kw, C, O), ``bias`` (O,)), initialization and result as
    ``nn.Conv(features, kernel_size, padding="VALID")``, but its gradient stays fast inside
    `lax.scan` on CPU, where XLA's convolution gradients run 10-30x slower than outside a loop
    (jax-ml/jax#12868). Training epochs here are scans, so the small LeNet convs use this.
    """

    features: int
    kernel_size: tuple[int, int]

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*self.kernel_size, in_features, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        patches = image_patches(x, self.kernel_size)
        return patches @ kernel.reshape(-1, self.features) + bias


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 of NHWC images with even H and W: (B, H, W, C) ->
    (B, H/2, W/2, C).

    The same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``, as a reshape and a max: its
    gradient is a compare-and-select instead of XLA's select-and-scatter, which is slow on CPU
    inside LeNet-5's training scan. The gradients are equal
    except where two inputs of a window tie at their (positive) maximum, where this one splits
    it between them.
    """
    batch, height, width, channels = x.shape
    if height % 2 or width % 2:
        raise ValueError(f"max_pool_2x2 needs even height and width, got {x.shape}.")
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


class MLP(nn.Module):
    """Fully connected ReLU network on flattened images.

    Attributes:
      hidden: widths of the hidden layers, e.g. (300, 100) for LeNet-300-100.
      num_classes: logits produced.
      input_shape: per-example input shape (H, W, C).
      dropout_rate: dropout on each hidden activation while training (0 disables it).
    """

    hidden: Sequence[int]
    num_classes: int = 10
    input_shape: tuple[int, ...] = (28, 28, 1)
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        _check_input(x, self.input_shape, type(self).__name__)
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"dense{i}")(x))
            if self.dropout_rate > 0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name=f"dense{len(self.hidden)}")(x)


class LeNet5(nn.Module):
    """LeNet-5, Caffe variant of the pruning literature: conv20@5x5 - pool - conv50@5x5 - pool -
    fc500 - fc10 (431,080 parameters), ReLU after every hidden layer."""

    num_classes: int = 10
    input_shape: tuple[int, ...] = (28, 28, 1)

    @nn.compact
    def __call__(self, x, train: bool = False):
        _check_input(x, self.input_shape, "LeNet5")
        x = max_pool_2x2(nn.relu(PatchConv(20, (5, 5), name="conv0")(x)))
        x = max_pool_2x2(nn.relu(PatchConv(50, (5, 5), name="conv1")(x)))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(500, name="dense0")(x))
        return nn.Dense(self.num_classes, name="dense1")(x)


class _ResidualBlock(nn.Module):
    filters: int
    strides: int

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=nn.initializers.he_normal())
        y = conv(self.filters, (3, 3), strides=self.strides, padding="SAME")(x)
        y = nn.relu(norm()(y))
        y = conv(self.filters, (3, 3), padding="SAME")(y)
        y = norm(scale_init=nn.initializers.zeros)(y)
        if x.shape != y.shape:
            # He et al.'s option A: parameter-free shortcut (subsample + zero-pad channels), which
            # gives the literature's parameter counts (ResNet-20: 0.27M).
            x = x[:, :: self.strides, :: self.strides, :]
            pad = self.filters - x.shape[-1]
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
        return nn.relu(x + y)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR-10 (He et al. 2016, section 4.2): 16/32/64 filters, n blocks each."""

    blocks_per_stage: int
    num_classes: int = 10
    input_shape: tuple[int, ...] = (32, 32, 3)

    @nn.compact
    def __call__(self, x, train: bool = False):
        _check_input(x, self.input_shape, f"ResNet-{6 * self.blocks_per_stage + 2}")
        x = nn.Conv(16, (3, 3), padding="SAME", use_bias=False,
                    kernel_init=nn.initializers.he_normal())(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        for stage, filters in enumerate((16, 32, 64)):
            for block in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = _ResidualBlock(filters, strides)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


class TransformerBlock(nn.Module):
    """A pre-LayerNorm transformer block: multi-head self-attention (``DenseGeneral`` q/k/v/out,
    causal when asked) and a gelu MLP, each added back to its input."""

    heads: int
    mlp: int
    causal: bool = False

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(name="norm1")(x)
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2])) if self.causal else None
        x = x + nn.MultiHeadDotProductAttention(self.heads, name="attn")(y, y, mask=mask)
        y = nn.LayerNorm(name="norm2")(x)
        y = nn.Dense(self.mlp, name="mlp_in")(y)
        return x + nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(y))


class ViT(nn.Module):
    """A small Vision Transformer for 28×28 images: 4×4 patches (49 tokens) embedded by a Dense
    layer, learned positions, ``depth`` pre-LayerNorm blocks, mean-pooled tokens, a Dense
    classifier (71,946 parameters at the defaults)."""

    num_classes: int = 10
    input_shape: tuple[int, ...] = (28, 28, 1)
    patch: int = 4
    dim: int = 64
    heads: int = 4
    mlp: int = 128
    depth: int = 2

    @nn.compact
    def __call__(self, x, train: bool = False):
        _check_input(x, self.input_shape, "ViT")
        b, h, w, c = x.shape
        p = self.patch
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = nn.Dense(self.dim, name="embed")(x.reshape(b, (h // p) * (w // p), p * p * c))
        x = x + self.param("position", nn.initializers.normal(0.02), x.shape[1:])
        for i in range(self.depth):
            x = TransformerBlock(self.heads, self.mlp, name=f"block{i}")(x)
        x = nn.LayerNorm(name="norm")(x).mean(axis=1)
        return nn.Dense(self.num_classes, name="head")(x)


class GPT(nn.Module):
    """A small byte-level decoder-only transformer (GPT): byte embedding, learned positions,
    ``depth`` causal pre-LayerNorm blocks, final LayerNorm and a Dense head over the 256 bytes
    (not tied to the embedding, so every projection is a prunable map); 478,976 parameters at
    the defaults. Input: uint8/int bytes (batch, T ≤ context); output: next-byte logits
    (batch, T, 256)."""

    num_classes: int = 256
    context: int = 128
    dim: int = 128
    heads: int = 4
    mlp: int = 512
    depth: int = 2

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        if tokens.ndim != 2 or tokens.shape[1] > self.context or \
                not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"GPT expects integer byte tokens of shape (batch, T ≤ "
                             f"{self.context}), got {tokens.dtype} {tuple(tokens.shape)}.")
        x = nn.Embed(self.num_classes, self.dim, name="embed")(tokens.astype(jnp.int32))
        position = self.param("position", nn.initializers.normal(0.02), (self.context, self.dim))
        x = x + position[:tokens.shape[1]]
        for i in range(self.depth):
            x = TransformerBlock(self.heads, self.mlp, causal=True, name=f"block{i}")(x)
        return nn.Dense(self.num_classes, name="head")(nn.LayerNorm(name="norm")(x))


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "lenet300100": lambda **kw: MLP(hidden=(300, 100), **kw),
    "lenet5": LeNet5,
    "nettrim_fc": lambda **kw: MLP(hidden=(300, 1000, 100), **kw),
    "resnet20": lambda **kw: CifarResNet(blocks_per_stage=3, **kw),
    "resnet32": lambda **kw: CifarResNet(blocks_per_stage=5, **kw),
    "resnet56": lambda **kw: CifarResNet(blocks_per_stage=9, **kw),
    "vit": ViT,
    "gpt": GPT,
}

MODELS: tuple[str, ...] = tuple(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds a registered model by name (`MODELS`); keyword arguments go to its constructor.

    ``nettrim_fc`` is the Net-Trim paper's 784-300-1000-100-10 network; pass ``dropout_rate`` to
    the MLPs to train them with dropout. ``vit`` is for 28×28 images (MNIST, Fashion-MNIST),
    ``gpt`` for the ``python_stdlib`` byte corpus.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    return _REGISTRY[name](**kwargs)


def count_params(params) -> int:
    """Number of scalars in a params pytree."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
