"""Finding a model's layers and recording their signals, by intercepting Flax module calls.

No per-model plumbing: any linen model works, whatever its structure (compact or setup(),
Sequential, nested modules), because every module's ``__call__`` passes through
`flax.linen.intercept_methods`. A layer's identity is its module path, ``"block1/conv0"``, the
same path as its params in the variables tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from hoyertrim.nettrim.adapters import LayerAdapter, adapter_for, own_params, supported_types


@dataclasses.dataclass
class Layer:
    """A module that holds a ``kernel``: its path, the module, its adapter (None: unsupported)
    and how many times the model calls it."""

    path: str
    module: nn.Module
    adapter: LayerAdapter | None
    calls: int = 1


def _path(module: nn.Module) -> str:
    return "/".join(module.path)


def layer_variables(tree: Mapping, path: str):
    """The subtree of ``tree`` (a params tree or one collection) at module ``path``, "a/b"."""
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _first_input(args, kwargs):
    if args:
        return args[0]
    return next(iter(kwargs.values()))


def find_layers(model: nn.Module, variables: Mapping, sample, apply_kwargs: Mapping
                ) -> tuple[dict[str, Layer], dict[str, jax.ShapeDtypeStruct]]:
    """Every module with its own ``kernel`` param, in call order, and the shape of each one's
    output (traced abstractly on ``sample``, nothing computed)."""
    layers: dict[str, Layer] = {}
    shapes: dict[str, jax.ShapeDtypeStruct] = {}

    def run(variables, images):
        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and "kernel" in own_params(context.module):
                path = _path(context.module)
                if path in layers:
                    layers[path].calls += 1
                else:
                    layers[path] = Layer(path, context.module.clone(parent=None),
                                         adapter_for(context.module))
                    shapes[path] = jax.ShapeDtypeStruct(np.shape(out), out.dtype)
            return out

        with nn.intercept_methods(interceptor):
            return model.apply(variables, images, **apply_kwargs)

    jax.eval_shape(run, variables, sample)
    return layers, shapes


def select_layers(found: Mapping[str, Layer], names: Sequence[str] | None) -> list[str]:
    """The layers to prune, in call order; clear errors for unknown or unsupported ones."""
    if not found:
        raise ValueError("The model has no layer with a 'kernel' parameter to prune.")
    if names is None:
        selected = list(found)
    else:
        if isinstance(names, str):
            names = [names]
        unknown = [n for n in names if n not in found]
        if unknown:
            raise ValueError(f"Unknown layers {unknown}; prunable layers are {list(found)}.")
        selected = [n for n in found if n in set(names)]
    for name in selected:
        layer = found[name]
        if layer.adapter is None:
            supported = [n for n in found if found[n].adapter is not None]
            raise NotImplementedError(
                f"Net-Trim cannot prune layer {name!r} ({type(layer.module).__name__}): supported "
                f"layer types are {', '.join(supported_types())}. Pass layers=[...] to prune "
                f"only supported layers (here {supported}), or register an adapter for this "
                "type with hoyertrim.nettrim.register_adapter.")
        if layer.calls > 1:
            raise NotImplementedError(
                f"Layer {name!r} is called {layer.calls} times (shared weights); Net-Trim prunes "
                "layers called once. Leave it out with layers=[...].")
    return selected


def make_capture(model: nn.Module, apply_kwargs: Mapping, paths: Sequence[str]):
    """A jitted ``(variables, images) -> (output, {path: (inputs, outputs)})``."""
    paths = frozenset(paths)

    @jax.jit
    def run(variables, images):
        captured = {}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__":
                path = _path(context.module)
                if path in paths and path not in captured:
                    captured[path] = (_first_input(args, kwargs), out)
            return out

        with nn.intercept_methods(interceptor):
            output = model.apply(variables, images, **apply_kwargs)
        return output, captured

    return run


class Recorder:
    """Runs a model in batches and records its layers' ``(inputs, outputs)``.

    One compiled function serves every call (the original, the pruned and the partly pruned
    networks have the same structure), so a whole `prune_network` compiles the model once per
    batch shape.
    """

    def __init__(self, model: nn.Module, apply_kwargs: Mapping, paths: Sequence[str],
                 batch_size: int = 1000):
        self._run = make_capture(model, apply_kwargs, paths)
        self.batch_size = batch_size

    def __call__(self, variables: Mapping, images: np.ndarray, paths: Sequence[str] = ()
                 ) -> tuple[np.ndarray, dict[str, Any]]:
        """The model's (first) output and ``{path: (inputs, outputs)}`` for ``paths``, as
        NumPy arrays over all ``images``."""
        outputs, captured = [], {p: ([], []) for p in paths}
        with jax.default_matmul_precision("highest"):
            for start in range(0, len(images), self.batch_size):
                output, layers = self._run(variables, images[start:start + self.batch_size])
                outputs.append(np.asarray(jax.tree.leaves(output)[0]))
                for path in paths:
                    captured[path][0].append(np.asarray(layers[path][0]))
                    captured[path][1].append(np.asarray(layers[path][1]))
        return (np.concatenate(outputs),
                {p: (np.concatenate(x), np.concatenate(z)) for p, (x, z) in captured.items()})


def capture(model: nn.Module, variables: Mapping, images: np.ndarray, apply_kwargs: Mapping,
            paths: Sequence[str], batch_size: int = 1000) -> tuple[np.ndarray, dict[str, Any]]:
    """Runs the model on ``images`` in batches; returns its (first) output and each layer's
    ``(inputs, outputs)`` as NumPy arrays over all images."""
    return Recorder(model, apply_kwargs, paths, batch_size)(variables, images, paths)


def capture_layers(model: nn.Module, variables: Mapping, images, apply_kwargs=None
                   ) -> dict[str, tuple]:
    """``{path: (inputs, outputs, Layer)}`` of every layer with a kernel, in call order."""
    apply_kwargs = dict(apply_kwargs or {})
    images = np.asarray(images)
    found, _ = find_layers(model, variables, images[:2], apply_kwargs)
    _, signals = capture(model, variables, images, apply_kwargs, list(found))
    return {p: (*signals[p], found[p]) for p in found}
