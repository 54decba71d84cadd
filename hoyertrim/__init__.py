"""hoyertrim: DeepHoyer sparsity penalties and Net-Trim convex pruning for JAX/Flax networks.

Modules: `penalties` (pure math), `transforms` (optax), `masks` (pruning rules and reports),
`nettrim` (layer-wise convex pruning), `data`, `models`, `train`, `checkpoint`.
"""

__version__ = "0.1.0"
