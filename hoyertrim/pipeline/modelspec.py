"""Which model a stage directory holds: a zoo name, ``package.module:Name`` or
``file.py:Name`` with keyword arguments, resolved to a linen module (an NNX class runs inside
`nnx_bridge.NnxModel`)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import pathlib
import sys
from typing import Mapping

import flax.linen as nn
from flax.core import FrozenDict

from hoyertrim import models
from hoyertrim.nnx_bridge import NnxModel, nnx_class_of
from hoyertrim.pipeline.errors import StageError
from hoyertrim.train import mode_kwargs


def resolve_model(spec: str, kwargs: Mapping | None = None, *,
                  search_path: str | None = None) -> nn.Module:
    """The model a spec names.

    Args:
      spec: a zoo name (`models.MODELS`), ``package.module:Name`` (imported; the current
        directory is searched) or ``path/to/file.py:Name``. ``Name`` is a linen Module class or
        an NNX Module class (constructed with ``rngs=nnx.Rngs(...)`` when its ``__init__``
        takes ``rngs``; see `nnx_bridge`); anything else is refused without being called, so a
        stage directory's manifest can name a module to import (as loading a pickle would run
        code) but never makes the library call an arbitrary function.
      kwargs: keyword arguments for it (e.g. ``{"dropout_rate": 0.3}``).
      search_path: a directory to put on ``sys.path`` for the import (the manifest records the
        one the model was first resolved from).

    Raises:
      StageError: the spec does not name a model; says why.
    """
    kwargs = dict(kwargs or {})
    if ":" not in spec:
        if spec not in models.MODELS:
            raise StageError(f"Unknown model {spec!r}: give a zoo name ({', '.join(models.MODELS)})"
                             " or your own as package.module:ClassName or file.py:ClassName.")
        return _build(lambda **kw: models.create_model(spec, **kw), kwargs, spec)
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise StageError(f"--model {spec} names no module or no class; give "
                         "package.module:ClassName or file.py:ClassName.")
    if where.endswith(".py"):
        path = pathlib.Path(where).expanduser()
        if not path.is_file():
            raise StageError(f"Model file {where} does not exist.")
        module_name = f"_hoyertrim_user_{abs(hash(str(path.absolute())))}"
        module = sys.modules.get(module_name)
        if module is None:
            loader = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[module_name] = module
            try:
                loader.loader.exec_module(module)
            except Exception as error:
                del sys.modules[module_name]
                raise StageError(f"Importing {where} failed: {type(error).__name__}: {error}") \
                    from error
    else:
        # The search path is widened for this import only (the caller's sys.path comes back
        # as it was); the imported module stays in sys.modules, as any import does.
        added = [d for d in dict.fromkeys((search_path, os.getcwd())) if d and d not in sys.path]
        sys.path[:0] = added
        try:
            module = importlib.import_module(where)
        except ImportError as error:
            raise StageError(f"Cannot import {where!r} for --model {spec}: {error}. Run from the "
                             "directory that holds it or install it.") from error
        finally:
            for directory in added:
                sys.path.remove(directory)
    target = getattr(module, name, None)
    if target is None:
        raise StageError(f"{where} has no {name!r} (for --model {spec}).")
    if not (isinstance(target, type) and (issubclass(target, nn.Module)
                                          or nnx_class_of(target))):
        raise StageError(f"{spec} names a {type(target).__name__}, not a Flax Module class; "
                         "give a linen or NNX Module class (nothing else is called).")
    return _build(target, kwargs, spec)


def _build(factory, kwargs, spec) -> nn.Module:
    if nnx_class_of(factory):  # run through linen: stages, checkpoints and training alike
        factory = functools.partial(_nnx_model, factory)
    try:
        model = factory(**kwargs)
    except TypeError as error:
        raise StageError(f"Cannot build {spec} with keyword arguments {kwargs}: {error}") from error
    if not isinstance(model, nn.Module):
        raise StageError(f"{spec} built a {type(model).__name__}, not a flax.linen Module or an "
                         "NNX Module class.")
    return model


def _nnx_model(nnx_class, **kwargs) -> NnxModel:
    model = NnxModel(nnx_class, FrozenDict(kwargs))
    model.build()  # the user's own errors (a wrong keyword) now, not inside a trace
    return model


def check_model(model: nn.Module, dataset, spec: str) -> None:
    """Runs the model abstractly (`jax.eval_shape`: no compute) on the data set's input shape
    and checks it gives one logit per class.

    Raises:
      StageError: the model fails on the inputs (its own error, first line, named), gives no
        array, or gives another number of outputs than the data set's classes.
    """
    import jax
    import jax.numpy as jnp

    sample = jax.ShapeDtypeStruct((2, *dataset.image_shape), jnp.dtype(dataset.input_dtype))
    kwargs = mode_kwargs(model, False)
    try:
        out = jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x,
                                                              **kwargs)[0], sample)
    except Exception as error:  # the user's model: any error of theirs, said in one line
        first = (str(error).strip().splitlines() or [""])[0]
        raise StageError(f"{spec} fails on {dataset.name}'s inputs (shape "
                         f"{tuple(sample.shape)}, {sample.dtype}): {type(error).__name__}: "
                         f"{first}") from error
    if not hasattr(out, "shape"):
        raise StageError(f"{spec} returns a {type(out).__name__}; hoyertrim needs one array of "
                         "logits (examples, classes).")
    if not out.shape or out.shape[-1] != dataset.num_classes:
        raise StageError(f"{spec} gives outputs of shape {tuple(out.shape)} per batch of 2; "
                         f"{dataset.name} has {dataset.num_classes} classes: make its last "
                         f"layer {dataset.num_classes} wide.")


def model_spec(spec: str, kwargs: Mapping | None = None) -> dict:
    """The manifest's record of a model: file paths made absolute, the import directory kept."""
    where, colon, name = spec.rpartition(":")
    if colon and where.endswith(".py"):
        spec = f"{pathlib.Path(where).expanduser().absolute()}:{name}"
    record = {"spec": spec, "kwargs": dict(kwargs or {})}
    if colon and not where.endswith(".py"):
        record["search_path"] = os.getcwd()
    return record


def model_of(manifest: Mapping) -> nn.Module:
    record = manifest["model"]
    return resolve_model(record["spec"], record.get("kwargs"),
                         search_path=record.get("search_path"))
