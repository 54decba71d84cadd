"""hoyertrim: DeepHoyer sparsity penalties and Net-Trim convex pruning for JAX/Flax networks.

Modules: `penalties` (pure math), `transforms` (optax), `masks` (pruning rules, schedules,
reports), `inspection` (a model's linear maps, found from its computation), `nettrim` (layer-wise
convex pruning), `peers` (SparseGPT, Wanda, magnitude), `pruners` (the registry of methods),
`compact`, `pipeline` (the stages the ``hoyertrim`` command runs), `data`, `models`, `train`,
`checkpoint`.
"""

__version__ = "0.1.0"


def load(directory, step=None):
    """`hoyertrim.pipeline.load`: params, model state, masks, config (and for a ``hoyertrim``
    command's directory the model, or the compact model) with no optimizer template;
    ``.predict(images)`` runs it."""
    from hoyertrim.pipeline import load as _load
    return _load(directory, step)
