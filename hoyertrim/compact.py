"""Compaction: a pruned network made physically smaller, with the same outputs.

A unit of a layer (a Dense output column, a conv filter) is removed when

- its kernel column is all zero: it outputs a constant (its bias through what follows), whose
  contribution is added into the consuming layer's bias; or
- no consumer reads it: its rows are all zero in the consuming layer's kernel;

and every layer gathers only the input features its kernel reads (e.g. the pixels a pruned
first layer still uses). Which consumer features come from which unit is found by running the
model once with an infinity placed in one unit per example (through ReLU, pooling, flatten and
inference BatchNorm it stays in its unit's features), so any linen model works without
plumbing.

A unit is only removed where that is provably output-preserving: its layer's output reaches
exactly one consuming layer (no residual branch, no second use) through a ReLU with at most
per-channel affine steps before it (`nettrim.graph`), the modules in between are inference-mode
BatchNorm (sliced with it) or parameter-free, each consumer feature comes from one unit (no op in
between mixes units), and a constant unit feeds a Dense layer or a
VALID convolution (elsewhere padding makes its contribution position-dependent, unless it is 0).
Grouped convolutions and layers of other types are kept whole.

The compact model runs the original module tree with each compacted layer computing on its
smaller arrays (`CompactModel.apply`), so nothing about the user's model has to be rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hoyertrim.inspection import graph
from hoyertrim.nettrim.adapters import ConvAdapter, DenseAdapter, adapter_for
from hoyertrim.nettrim.capture import find_layers, layer_variables


@dataclasses.dataclass
class CompactLayer:
    """One layer's compact arrays.

    Attributes:
      kernel: the smaller kernel (Dense: (N', M'); conv: (*window, C', M')).
      bias: (M',) or None.
      input_index: positions of the features (last axis) of the layer's actual input that it
        reads, or None for all.
      output_index: which of the original output units remain.
    """

    kernel: np.ndarray
    bias: np.ndarray | None
    input_index: np.ndarray | None
    output_index: np.ndarray


@dataclasses.dataclass
class CompactModel:
    """A compacted network: call ``apply(images)``; `weights` counts what it stores."""

    model: nn.Module
    variables: Any  # the original variables; compacted layers never read theirs
    layers: dict[str, CompactLayer]
    sliced: dict[str, dict]  # per-channel modules on a compacted path: {path: variables}
    apply_kwargs: dict

    def __post_init__(self):
        self._apply = jax.jit(self._forward)

    def apply(self, images) -> jax.Array:
        """The compact model's output for ``images``."""
        return self._apply(images)

    def _forward(self, images):
        def interceptor(next_fun, args, kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            path = "/".join(context.module.path)
            if path in self.layers:
                return _run_layer(context.module, self.layers[path], args[0])
            if path in self.sliced:
                return context.module.clone(parent=None).apply(self.sliced[path], *args,
                                                               **kwargs)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            return self.model.apply(self.variables, images, **self.apply_kwargs)

    def weights(self) -> int:
        """Kernel entries the compact layers store (dense storage)."""
        return sum(int(np.size(layer.kernel)) for layer in self.layers.values())


def _run_layer(module, layer: CompactLayer, x):
    if layer.input_index is not None:
        x = jnp.take(x, jnp.asarray(layer.input_index), axis=-1)
    if isinstance(module, nn.Dense):
        out = x @ layer.kernel
        return out if layer.bias is None else out + layer.bias
    params = {"kernel": layer.kernel}
    if layer.bias is not None:
        params["bias"] = layer.bias
    adapter = adapter_for(module)
    if not isinstance(module, nn.Conv) and getattr(adapter, "as_conv", None) is not None:
        module = adapter.as_conv(module)  # e.g. the zoo's PatchConv: run XLA's convolution
    if _row_matmul_applies(module, layer.kernel, x):
        return _conv_as_row_matmul(module, layer.kernel, layer.bias, x)
    probe = module.clone(parent=None, features=layer.kernel.shape[-1])
    if hasattr(probe, "use_bias"):  # a consumer without bias may get one (carried constants)
        probe = probe.clone(use_bias=layer.bias is not None)
    return probe.apply({"params": params}, x)


# Largest row-Toeplitz matrix (entries) `_conv_as_row_matmul` builds.
_ROW_MATMUL_MAX_ENTRIES = 1 << 20


def _row_matmul_applies(module, kernel, x) -> bool:
    """Whether a conv runs as one matmul per output row: on CPU, for plain stride-1 2-D convs
    with few input channels (≤ 8), where XLA's CPU convolution is slow (a 1-channel LeNet
    conv takes about as long with 7 filters as with 32) and the Toeplitz matrix stays small."""
    if jax.default_backend() != "cpu" or not isinstance(module, nn.Conv) or kernel.ndim != 4:
        return False
    ones = lambda value: all(v == 1 for v in np.atleast_1d(value or 1))  # noqa: E731
    padding = module.padding if isinstance(module.padding, str) else None
    if (padding not in ("VALID", "SAME") or not ones(module.strides)
            or not ones(module.kernel_dilation) or not ones(module.input_dilation)
            or module.feature_group_count != 1 or kernel.shape[2] > 8):
        return False
    kh, kw, cin, cout = kernel.shape
    width = x.shape[2] + (kw - 1 if padding == "SAME" else 0)
    return kh * width * cin * (width - kw + 1) * cout <= _ROW_MATMUL_MAX_ENTRIES


def _conv_as_row_matmul(module, kernel, bias, x):
    """A stride-1 2-D convolution as ``rows @ T``: each output row gathers the ``kh`` input rows
    it reads, (N·H', kh·W·C), and T (kh·W·C, W'·O) is the kernel laid out as a block-Toeplitz
    matrix, so the whole layer is one dense matmul. Same result as ``lax.conv`` up to float
    summation order."""
    kh, kw, cin, cout = kernel.shape
    if module.padding == "SAME":
        pads = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), (1, 1), "SAME")
        x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    n, height, width, _ = x.shape
    out_h, out_w = height - kh + 1, width - kw + 1
    toeplitz = np.zeros((kh, width, cin, out_w, cout), np.asarray(kernel).dtype)
    for j in range(out_w):
        toeplitz[:, j:j + kw, :, j, :] = kernel
    rows = jnp.stack([x[:, a:a + out_h] for a in range(kh)], axis=2)  # (N, H', kh, W, C)
    out = rows.reshape(n * out_h, kh * width * cin) @ toeplitz.reshape(-1, out_w * cout)
    out = out.reshape(n, out_h, out_w, cout)
    return out if bias is None else out + bias


@dataclasses.dataclass
class _Recording:
    """One eager run of the model: per module path (call order, post-order), its first
    positional input, its output, and whether it is a BatchNorm / holds params (its own or its
    submodules')."""

    inputs: dict
    outputs: dict
    batch_norm: dict
    has_params: dict
    output: Any


def _record(model, variables, images, apply_kwargs, override=None) -> _Recording:
    """Runs the model once, recording every module call, with module outputs optionally
    replaced (``override``: {path: array})."""
    rec = _Recording({}, {}, {}, {}, None)

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            path = "/".join(context.module.path)
            if path and args and path not in rec.inputs:
                rec.inputs[path], rec.outputs[path] = args[0], out
                rec.batch_norm[path] = isinstance(context.module, nn.BatchNorm)
                rec.has_params[path] = bool(context.module.variables.get("params"))
            if override and path in override:
                return override[path]
        return out

    with nn.intercept_methods(interceptor):
        rec.output = model.apply(variables, images, **apply_kwargs)
    return rec


def compact(model: nn.Module, variables, sample, *, apply_kwargs: Mapping | None = None
            ) -> CompactModel:
    """Removes dead and unread units of a pruned model (see the module docstring).

    Args:
      model: the linen model.
      variables: its (pruned) params tree, or the full variables dict.
      sample: (B, ...) a few inputs (one is enough) to trace and probe the model with.
      apply_kwargs: keyword arguments ``model.apply`` needs (e.g. ``{"train": False}``).

    Returns:
      A `CompactModel` whose ``apply`` equals the pruned model's output (up to float rounding).
    """
    apply_kwargs = dict(apply_kwargs or {})
    variables = flax.core.unfreeze(variables)
    if not (isinstance(variables, Mapping) and "params" in variables):
        variables = {"params": variables}
    params = variables["params"]
    sample = jnp.asarray(sample)[:1]
    found, shapes = find_layers(model, variables, sample, apply_kwargs)
    order = list(found)
    followers = graph.followers(model, variables, sample, apply_kwargs, shapes)
    clean = _record(model, variables, sample, apply_kwargs)

    def compactable(path):
        layer = found[path]
        return (layer.calls == 1 and type(layer.adapter) in (DenseAdapter, ConvAdapter)
                and int(getattr(layer.module, "feature_group_count", 1) or 1) == 1)

    matrices = {p: layer.adapter.matrix(layer.module, layer_variables(params, p))
                for p, layer in found.items() if compactable(p)}
    removed: dict[str, np.ndarray] = {}     # producer -> removed output units
    dropped_features: dict[str, np.ndarray] = {}  # consumer -> removed input features
    bias_shift: dict[str, np.ndarray] = {}
    sliced: dict[str, dict] = {}
    for producer in order:
        if producer not in matrices or followers[producer].program != "relu":
            continue
        plan = _plan_removal(model, variables, sample, apply_kwargs, producer, found, order,
                             clean, matrices, followers[producer])
        if plan is None:
            continue
        units, consumer, features_of, between, shift = plan
        if len(units) == 0:
            continue
        removed[producer] = units
        dropped_features[consumer] = np.concatenate([features_of[u] for u in units])
        bias_shift[consumer] = bias_shift.get(consumer, 0) + shift
        keep = np.setdiff1d(np.arange(matrices[producer].shape[1]), units)
        for module_path in between:
            sliced[module_path] = _slice_channels(variables, module_path, keep)

    layers = {}
    for path in matrices:
        p = layer_variables(params, path)
        kernel = np.asarray(p["kernel"])
        bias = None if p.get("bias") is None else np.asarray(p["bias"], np.float64)
        if path in bias_shift:
            bias = (0.0 if bias is None else bias) + bias_shift[path]
        outputs = np.setdiff1d(np.arange(kernel.shape[-1]), removed.get(path, []))
        in_axis = kernel.ndim - 2  # Dense: rows; conv: input channels
        # The features the layer receives at run time (its producer's removed units gone, in
        # order), and among them those its kernel reads.
        upstream = np.setdiff1d(np.arange(np.shape(clean.inputs[path])[-1]),
                                dropped_features.get(path, []))
        kernel = np.take(kernel, upstream, axis=in_axis)
        other_axes = tuple(a for a in range(kernel.ndim) if a != in_axis)
        read = np.flatnonzero(np.any(kernel != 0, axis=other_axes))
        if len(read) == 0:
            read = np.array([0])  # keep one (zero) input so the layer still has a shape
        kernel = np.take(kernel, read, axis=in_axis)[..., outputs]
        layers[path] = CompactLayer(
            kernel=kernel.astype(np.asarray(p["kernel"]).dtype),
            bias=None if bias is None else bias[outputs].astype(np.float32),
            input_index=None if len(read) == len(upstream) else read, output_index=outputs)
    return CompactModel(model=model, variables=variables, layers=layers, sliced=sliced,
                        apply_kwargs=apply_kwargs)


def _slice_channels(variables, path, keep):
    """The variables of a per-channel module (BatchNorm) restricted to channels ``keep``."""
    out = {}
    for collection, tree in variables.items():
        try:
            node = layer_variables(tree, path)
        except (KeyError, TypeError):
            continue
        out[collection] = jax.tree.map(lambda a: np.asarray(a)[..., keep], node)
    return out


def _plan_removal(model, variables, sample, apply_kwargs, producer, found, order,
                  clean: _Recording, matrices, follower):
    """Which units of ``producer`` can go, its consumer, the consumer input features each unit
    feeds, the per-channel modules in between, and the consumer's bias shift; None when the
    producer's units cannot be removed safely."""
    width = matrices[producer].shape[1]
    z = clean.outputs[producer]
    probe = jnp.repeat(z, width, axis=0)
    # Example u carries an infinity in unit u, signed so that the folded affine map before the
    # ReLU keeps it +inf: ReLU, max/avg pooling and flatten then keep it in u's features (a NaN
    # would be dropped by max pooling).
    marker = jnp.where(follower.scale < 0, -jnp.inf, jnp.inf)
    hot = jnp.eye(width, dtype=bool).reshape((width,) + (1,) * (z.ndim - 2) + (width,))
    probe = jnp.where(hot, marker, probe)
    batch = jnp.repeat(sample, width, axis=0)
    inputs = _record(model, variables, batch, apply_kwargs, {producer: probe}).inputs
    later = order[order.index(producer) + 1:]
    consumer = next((m for m in later if not bool(jnp.all(jnp.isfinite(inputs[m])))), None)
    if consumer is None or consumer not in matrices:
        return None
    # The consumer must be the only way the producer reaches anything: with the consumer's
    # output replaced by its clean value (the batch repeats the sample, so that value is the
    # sample's), nothing non-finite may remain downstream.
    clean_consumer = jnp.repeat(clean.outputs[consumer], width, axis=0)
    rest = _record(model, variables, batch, apply_kwargs,
                   {producer: probe, consumer: clean_consumer})
    if not bool(jnp.all(jnp.isfinite(rest.output))) or any(
            not bool(jnp.all(jnp.isfinite(rest.inputs[m]))) for m in later if m != consumer):
        return None
    call_order = list(clean.inputs)
    start, stop = call_order.index(producer), call_order.index(consumer)
    between = [m for m in call_order[start + 1:stop]
               if not consumer.startswith(m) and not bool(jnp.all(jnp.isfinite(inputs[m])))]
    if any(clean.has_params[m] and not clean.batch_norm[m] for m in between):
        return None
    consumer_in = np.asarray(inputs[consumer])
    spatial = tuple(range(1, consumer_in.ndim - 1))
    marked = ~np.isfinite(consumer_in)
    touched = marked.any(axis=spatial) if spatial else marked
    if np.any(touched.sum(axis=0) > 1):
        return None  # an op in between mixes units: a feature is no longer one unit's
    features_of = [np.flatnonzero(touched[u]) for u in range(width)]
    consumer_matrix = matrices[consumer]
    consumer_layer = found[consumer]
    consumer_params = layer_variables(variables["params"], consumer)
    consumer_kernel = np.asarray(consumer_params["kernel"])
    in_axis = consumer_kernel.ndim - 2
    dead = ~np.any(matrices[producer] != 0, axis=0)
    constants = np.asarray(clean.inputs[consumer])
    units, shift = [], np.zeros(consumer_kernel.shape[-1])
    for u in range(width):
        rows = features_of[u]
        if len(rows) == 0:
            continue
        unread = not np.any(np.take(consumer_kernel, rows, axis=in_axis))
        if unread:
            units.append(u)
            continue
        if not dead[u]:
            continue
        values = constants[..., rows].reshape(-1, len(rows))
        if np.all(values == 0):
            units.append(u)
            continue
        if isinstance(consumer_layer.module, nn.Dense):
            shift += values[0] @ consumer_matrix[rows]
            units.append(u)
        elif _valid_conv(consumer_layer.module) and np.all(values == values.flat[0]):
            # A VALID window always lies inside the input: each output position sees this
            # constant channel through every tap of the kernel.
            taps = np.take(consumer_kernel, rows, axis=in_axis)
            shift += float(values.flat[0]) * taps.reshape(-1, taps.shape[-1]).sum(axis=0)
            units.append(u)
    return np.array(units, int), consumer, features_of, between, shift


def _valid_conv(module) -> bool:
    padding = getattr(module, "padding", "VALID")
    dilated = any(d != 1 for d in np.atleast_1d(getattr(module, "input_dilation", None) or 1))
    if isinstance(padding, str):
        return padding.upper() == "VALID" and not dilated
    return all(p == (0, 0) or p == 0 for p in np.atleast_1d(padding)) and not dilated


_FORMAT = 2


def _without(variables, paths) -> dict:
    """``variables`` with the subtrees at module ``paths`` removed (compacted layers never read
    theirs, so the compact model need not store them)."""
    def prune(tree, prefix):
        out = {}
        for key, value in tree.items():
            path = f"{prefix}/{key}" if prefix else key
            if path in paths:
                continue
            out[key] = prune(value, path) if isinstance(value, Mapping) else value
        return out
    return {c: prune(tree, "") for c, tree in variables.items()}


def _flat(tree, prefix=""):
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from _flat(value, path)
        else:
            yield path, np.asarray(value)


def _unflat(items) -> dict:
    tree: dict = {}
    for path, value in items:
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def save_compact(directory, compacted: CompactModel) -> pathlib.Path:
    """Writes the compact model's arrays to ``directory/compact.npz`` (zip-compressed; a kernel
    with zeros left is stored as a bit mask of its nonzeros plus their values, in row-major
    order, when that is smaller: below 31/32 nonzero for float32) and its structure to
    ``compact.json``. The model itself is code: pass it to `load_compact`."""
    path = pathlib.Path(directory).expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True)
    arrays, meta = {}, {"format": _FORMAT, "layers": {}, "sliced": sorted(compacted.sliced),
                        "apply_kwargs": compacted.apply_kwargs}
    for name, layer in compacted.layers.items():
        key = f"layer|{name}"
        kernel = np.asarray(layer.kernel)
        nonzero = kernel.reshape(-1) != 0
        # One bit per entry against the bytes of the zeros it saves.
        sparse = (kernel.size - np.count_nonzero(nonzero)) * kernel.itemsize * 8 > kernel.size
        if sparse:
            arrays[f"{key}|kernel_mask"] = np.packbits(nonzero)
            arrays[f"{key}|kernel_values"] = kernel.reshape(-1)[nonzero]
        else:
            arrays[f"{key}|kernel"] = kernel
        if layer.bias is not None:
            arrays[f"{key}|bias"] = np.asarray(layer.bias)
        if layer.input_index is not None:
            arrays[f"{key}|input_index"] = np.asarray(layer.input_index, np.int32)
        arrays[f"{key}|output_index"] = np.asarray(layer.output_index, np.int32)
        meta["layers"][name] = {"shape": list(kernel.shape), "dtype": str(kernel.dtype),
                                "sparse": bool(sparse)}
    for module, variables in compacted.sliced.items():
        for leaf, value in _flat(variables):
            arrays[f"sliced|{module}|{leaf}"] = value
    rest = _without(compacted.variables, set(compacted.layers) | set(compacted.sliced))
    for leaf, value in _flat(rest):
        arrays[f"rest|{leaf}"] = value
    np.savez_compressed(path / "compact.npz", **arrays)
    (path / "compact.json").write_text(json.dumps(meta, indent=1))
    return path


def load_compact(directory, model: nn.Module) -> CompactModel:
    """The `CompactModel` `save_compact` wrote, for ``model`` (the same module definition)."""
    path = pathlib.Path(directory).expanduser().absolute()
    if not (path / "compact.json").is_file() or not (path / "compact.npz").is_file():
        raise FileNotFoundError(f"No compact model in {path} (compact.json and compact.npz).")
    try:
        meta = json.loads((path / "compact.json").read_text())
        with np.load(path / "compact.npz") as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"The compact model in {path} is damaged: {error}") from error
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} holds compact format {meta.get('format')}, this hoyertrim "
                         f"reads {_FORMAT}.")
    layers = {}
    for name, info in meta["layers"].items():
        key = f"layer|{name}"
        if info["sparse"]:
            size = int(np.prod(info["shape"]))
            kernel = np.zeros(size, info["dtype"])
            nonzero = np.unpackbits(arrays[f"{key}|kernel_mask"], count=size).astype(bool)
            kernel[nonzero] = arrays[f"{key}|kernel_values"]
            kernel = kernel.reshape(info["shape"])
        else:
            kernel = arrays[f"{key}|kernel"]
        layers[name] = CompactLayer(kernel=kernel, bias=arrays.get(f"{key}|bias"),
                                    input_index=arrays.get(f"{key}|input_index"),
                                    output_index=arrays[f"{key}|output_index"])
    sliced = {m: _unflat((k.split("|", 2)[2], v) for k, v in arrays.items()
                         if k.startswith(f"sliced|{m}|")) for m in meta["sliced"]}
    rest = _unflat((k.split("|", 1)[1], v) for k, v in arrays.items() if k.startswith("rest|"))
    return CompactModel(model=model, variables=rest, layers=layers, sliced=sliced,
                        apply_kwargs=meta["apply_kwargs"])
