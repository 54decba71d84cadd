"""Small models and data sets shared by several test modules (and by the scripts some tests run
in a subprocess, which put this folder on their path)."""

import numpy as np

from hoyertrim.data import Dataset, Split
from hoyertrim.models import MLP


def synthetic(train=6000):
    """A two-class problem on 8×8×1 inputs: is the sum of the first 32 pixels above 16?"""
    rng = np.random.default_rng(0)

    def split(n):
        x = rng.random((n, 8, 8, 1), dtype=np.float32)
        return Split(x, (x.reshape(n, -1)[:, :32].sum(1) > 16).astype(np.int32))

    return Dataset("synthetic", split(train), split(500), split(500), 2)


def small_mlp():
    return MLP(hidden=(128, 64), num_classes=2, input_shape=(8, 8, 1))
