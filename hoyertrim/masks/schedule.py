"""Sparsity schedules for gradual pruning (the kept fraction falling over training steps)."""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["polynomial_sparsity"]


def polynomial_sparsity(step, final_sparsity: float, begin_step: int, end_step: int,
                        initial_sparsity: float = 0.0, power: float = 3.0):
    """Zhu & Gupta (2017) gradual pruning schedule.

    s(t) = s_f + (s_i − s_f)·(1 − (t − t₀)/(t₁ − t₀))^power for t₀ ≤ t ≤ t₁, s_i before t₀ and
    s_f after t₁. Works on Python numbers and traced arrays alike.
    """
    if end_step <= begin_step:
        raise ValueError(f"end_step ({end_step}) must be greater than begin_step ({begin_step}).")
    progress = jnp.clip((step - begin_step) / (end_step - begin_step), 0.0, 1.0)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** power
