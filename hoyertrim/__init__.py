"""hoyertrim: DeepHoyer sparsity penalties and Net-Trim convex pruning for JAX/Flax networks.

Modules: `penalties` (pure math), `transforms` (optax), `masks` (pruning rules and reports),
`nettrim` (layer-wise convex pruning), `data`, `models`, `train`, `checkpoint`.
"""

__version__ = "0.1.0"


def load(directory, step=None):
    """`hoyertrim.checkpoint.load`: params, model state, masks and config of a checkpoint
    directory, with no optimizer template."""
    from hoyertrim.checkpoint import load as _load
    return _load(directory, step)
