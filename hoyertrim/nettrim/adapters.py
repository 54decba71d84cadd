"""Layer adapters: how Net-Trim sees a Flax layer as ``z = rows(x) @ matrix + bias``.

Net-Trim prunes any layer that is linear in its kernel: a Dense layer (rows = the inputs), a
convolution (rows = the patches under each output position, one column per output filter).
An adapter says, for one module type, how to build the (N, M) matrix from the layer's params and
back, which input rows feed which output positions, and which matrix entries exist at all
(grouped convolutions are block-diagonal). `register_adapter` adds one for a user's own layer
type; the model zoo registers its ``PatchConv`` this way. A module with a ``kernel`` param and no
adapter is refused by name.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_PATCH_CHUNK = 128  # images whose patches are extracted at once (bounds memory)


class LayerAdapter:
    """Base adapter; subclasses implement the four methods below for one layer type.

    ``params`` is the layer's own params dict (e.g. ``{"kernel": ..., "bias": ...}``).
    """

    def matrix(self, module: nn.Module, params: Mapping) -> np.ndarray:
        """(N, M) kernel as a matrix: rows are input features, columns output units."""
        raise NotImplementedError

    def with_matrix(self, module: nn.Module, params: Mapping, matrix: np.ndarray,
                    bias: np.ndarray | None) -> dict:
        """The layer's params with ``matrix`` (and ``bias``, when the layer has one) put back;
        same keys, shapes and dtypes as ``params``."""
        raise NotImplementedError

    def input_rows(self, module: nn.Module, params: Mapping, inputs,
                   rows: np.ndarray | None) -> np.ndarray:
        """(len(rows), N) inputs of the flat output positions ``rows`` (indices into the
        output reshaped to (-1, M); None: all)."""
        raise NotImplementedError

    def support(self, module: nn.Module, params: Mapping) -> np.ndarray | None:
        """(N, M) bool of the entries that exist (None: all)."""
        return None

    def bias(self, module: nn.Module, params: Mapping) -> np.ndarray | None:
        """(M,) bias, or None when the layer has none."""
        return None if params.get("bias") is None else np.asarray(params["bias"])


class DenseAdapter(LayerAdapter):
    """``nn.Dense`` (with or without bias; inputs of any rank, features on the last axis)."""

    def matrix(self, module, params):
        return np.asarray(params["kernel"])

    def with_matrix(self, module, params, matrix, bias):
        new = dict(params)
        new["kernel"] = np.asarray(matrix, params["kernel"].dtype)
        if "bias" in params and bias is not None:
            new["bias"] = np.asarray(bias, params["bias"].dtype)
        return new

    def input_rows(self, module, params, inputs, rows):
        flat = np.asarray(inputs).reshape(-1, np.shape(inputs)[-1])
        return flat if rows is None else flat[rows]


def _identity_patches(module: nn.Conv, images, kernel_shape) -> jax.Array:
    """Patches of ``images`` under ``module``'s own padding, strides and dilations.

    The convolution is run with an identity kernel (one output feature per kernel entry, in the
    order of ``kernel.reshape(-1, O)``), so whatever padding mode, stride, input or kernel
    dilation and dimensionality Flax supports, the rows are exactly what the layer multiplies.
    """
    channels = images.shape[-1]
    spatial = kernel_shape[:-2]
    taps = math.prod(spatial) * channels  # spatial taps × input channels (all groups)
    eye = jnp.eye(taps, dtype=jnp.float32).reshape(*spatial, channels, taps)
    probe = module.clone(parent=None, features=taps, feature_group_count=1, use_bias=False,
                         precision=jax.lax.Precision.HIGHEST, mask=None)
    return probe.apply({"params": {"kernel": eye}}, images.astype(jnp.float32))


class ConvAdapter(LayerAdapter):
    """``nn.Conv`` of any dimensionality, padding (SAME, VALID, CIRCULAR, CAUSAL, explicit),
    strides, input/kernel dilation and ``feature_group_count`` (each group's block of the
    matrix is its own set of entries; depthwise included).

    Args:
      patches: ``(module, images) -> (B, *out_spatial, taps)`` for module types whose patches
        are not those of ``nn.Conv`` with an identity kernel (default: that).
      as_conv: for such a type, the ``nn.Conv`` computing the same function (used to run its
        smaller compacted kernels with XLA's convolution).
    """

    def __init__(self, patches: Callable[[nn.Module, jax.Array], jax.Array] | None = None,
                 as_conv: Callable[[nn.Module], nn.Conv] | None = None):
        self._patches = patches
        self.as_conv = as_conv

    @staticmethod
    def _groups(module) -> int:
        return int(getattr(module, "feature_group_count", 1) or 1)

    def matrix(self, module, params):
        kernel = np.asarray(params["kernel"])
        groups = self._groups(module)
        if groups == 1:
            return kernel.reshape(-1, kernel.shape[-1])
        *spatial, per_group, outputs = kernel.shape
        per_out = outputs // groups
        full = np.zeros((*spatial, per_group * groups, outputs), kernel.dtype)
        for g in range(groups):
            full[..., g * per_group:(g + 1) * per_group, g * per_out:(g + 1) * per_out] = \
                kernel[..., g * per_out:(g + 1) * per_out]
        return full.reshape(-1, outputs)

    def support(self, module, params):
        groups = self._groups(module)
        if groups == 1:
            return None
        *spatial, per_group, outputs = params["kernel"].shape
        per_out = outputs // groups
        block = np.kron(np.eye(groups, dtype=bool), np.ones((per_group, per_out), bool))
        return np.broadcast_to(block, (*spatial, *block.shape)).reshape(-1, outputs)

    def with_matrix(self, module, params, matrix, bias):
        kernel = np.asarray(params["kernel"])
        groups = self._groups(module)
        *spatial, per_group, outputs = kernel.shape
        full = np.asarray(matrix).reshape(*spatial, per_group * groups, outputs)
        if groups == 1:
            new_kernel = full
        else:
            per_out = outputs // groups
            new_kernel = np.concatenate(
                [full[..., g * per_group:(g + 1) * per_group, g * per_out:(g + 1) * per_out]
                 for g in range(groups)], axis=-1)
        new = dict(params)
        new["kernel"] = new_kernel.astype(kernel.dtype)
        if "bias" in params and bias is not None:
            new["bias"] = np.asarray(bias, params["bias"].dtype)
        return new

    def _patch(self, module, images, kernel_shape):
        if self._patches is not None:
            return self._patches(module, images)
        return _identity_patches(module, images, kernel_shape)

    def input_rows(self, module, params, inputs, rows):
        kernel_shape = np.shape(params["kernel"])
        inputs = jnp.asarray(inputs)
        first = self._patch(module, inputs[:1], kernel_shape)
        positions = math.prod(first.shape[1:-1])
        if rows is None:
            rows = np.arange(inputs.shape[0] * positions)
        rows = np.asarray(rows)
        images = rows // positions
        out = np.empty((len(rows), first.shape[-1]), np.float32)
        for start in range(0, inputs.shape[0], _PATCH_CHUNK):
            chunk = (images >= start) & (images < start + _PATCH_CHUNK)
            if not np.any(chunk):
                continue
            patches = np.asarray(self._patch(module, inputs[start:start + _PATCH_CHUNK],
                                             kernel_shape)).reshape(-1, first.shape[-1])
            out[chunk] = patches[rows[chunk] - start * positions]
        return out


_ADAPTERS: dict[type, LayerAdapter] = {nn.Dense: DenseAdapter(), nn.Conv: ConvAdapter()}


def register_adapter(module_type: type, adapter: LayerAdapter) -> None:
    """Makes Net-Trim prune layers of ``module_type`` (and its subclasses) through ``adapter``."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be a flax.linen.Module subclass, got {module_type!r}.")
    if not isinstance(adapter, LayerAdapter):
        raise TypeError(f"adapter must be a LayerAdapter, got {type(adapter).__name__}.")
    _ADAPTERS[module_type] = adapter


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter of the most specific registered type ``module`` is an instance of."""
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return None


def supported_types() -> list[str]:
    """Names of the module types Net-Trim can prune."""
    return sorted(t.__name__ for t in _ADAPTERS)


def own_params(module: nn.Module) -> dict[str, Any]:
    """The array params a bound module holds itself (not its submodules')."""
    try:
        params = module.variables.get("params", {})
    except Exception:  # an unbound or param-less module
        return {}
    return {k: v for k, v in params.items() if not isinstance(v, Mapping)}
