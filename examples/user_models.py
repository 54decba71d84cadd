"""Flax models written the ordinary way, as users bring them — none from hoyertrim's zoo.

Net-Trim is tested on every one of them (tests/test_nettrim_user_models.py), and the first two
are trained on MNIST for the results of docs/results_mnist.md (`experiments/run.py user_*`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class FlaxExampleCNN(nn.Module):
    """The Flax examples' MNIST CNN (examples/mnist): default SAME padding, average pooling."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(features=32, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.Conv(features=64, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(features=256)(x)
        x = nn.relu(x)
        return nn.Dense(features=10)(x)


class ConvBatchNormCNN(nn.Module):
    """Conv → BatchNorm → ReLU blocks (convs without bias), max pooling, dropout."""

    widths: tuple[int, ...] = (32, 64)
    hidden: int = 128
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x, train: bool = False):
        for width in self.widths:
            x = nn.Conv(width, (3, 3), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.hidden)(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(10)(x)


class StridedCNN(nn.Module):
    """Strided SAME 5×5 conv, a 1×1 conv, a dilated conv, explicit padding, global pooling."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (5, 5), strides=(2, 2), padding="SAME")(x))
        x = nn.relu(nn.Conv(12, (1, 1))(x))
        x = nn.relu(nn.Conv(12, (3, 3), kernel_dilation=(2, 2), padding=((2, 1), (1, 2)))(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(10)(x)


class SeparableCNN(nn.Module):
    """Depthwise-separable blocks: a grouped (depthwise) 3×3 conv, then a pointwise 1×1."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (3, 3), feature_group_count=8)(x))  # depthwise, multiplier 2
        x = nn.relu(nn.Conv(16, (1, 1))(x))
        x = nn.relu(nn.Conv(16, (3, 3), feature_group_count=4, padding="CIRCULAR")(x))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(10)(x)


class Conv1D(nn.Module):
    """A 1-D CNN on (batch, length, channels) signals, with a causal conv."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (5,), padding="CAUSAL")(x))
        x = nn.relu(nn.Conv(8, (3,), strides=(2,))(x))
        return nn.Dense(4)(x.reshape((x.shape[0], -1)))


class SetupMLP(nn.Module):
    """A setup()-style MLP whose middle layer has no bias."""

    def setup(self):
        self.hidden = nn.Dense(32)
        self.no_bias = nn.Dense(24, use_bias=False)
        self.out = nn.Dense(10)

    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(self.hidden(x))
        x = nn.relu(self.no_bias(x))
        return self.out(x)


class HeadFirstMLP(nn.Module):
    """setup() declares the head first: call order differs from declaration order."""

    def setup(self):
        self.head = nn.Dense(10)
        self.first = nn.Dense(32)
        self.second = nn.Dense(24)

    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return self.head(nn.relu(self.second(nn.relu(self.first(x)))))


class SmoothMLP(nn.Module):
    """gelu and tanh hidden layers: no ReLU anywhere."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.gelu(nn.Dense(32)(x))
        x = jnp.tanh(nn.Dense(24)(x))
        return nn.Dense(10)(x)


class ResidualMLP(nn.Module):
    """A residual block: the second Dense's output meets the skip connection before the ReLU."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(24)(x.reshape((x.shape[0], -1))))
        y = nn.relu(nn.Dense(24)(x))
        x = nn.relu(x + nn.Dense(24)(y))
        return nn.Dense(10)(x)


def sequential_mlp() -> nn.Sequential:
    """An nn.Sequential MLP."""
    return nn.Sequential([lambda x: x.reshape((x.shape[0], -1)), nn.Dense(32), nn.relu,
                          nn.Dense(24), nn.relu, nn.Dense(10)])


class ValidCNN(nn.Module):
    """A CNN with padding="VALID" convolutions and max pooling."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(16, (3, 3), padding="VALID")(x))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class WithDenseGeneral(nn.Module):
    """A DenseGeneral layer with two output axes between two Dense layers."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1))))
        x = nn.relu(nn.DenseGeneral((4, 4))(x)).reshape((x.shape[0], -1))
        return nn.Dense(10)(x)
