"""Optax transforms for sparse training: penalty gradients and fixed pruning masks.

Ordering rules (tested in tests/test_transforms.py):

* Penalty transforms go *before* the optimizer::

      tx = optax.chain(hoyer_square_regularization(1e-4), optax.adam(1e-3))

  `add_penalty_gradient` adds ``strength * ∇R(params)`` to the incoming gradients, so the
  optimizer sees the gradient of ``loss + strength * R`` — exactly the paper's objective. Chained
  after the optimizer it would bypass Adam's normalization and mean something else.

* Masks wrap the optimizer: ``masked_fine_tuning(optax.adam(1e-4), masks)`` zeroes the gradients of pruned
  weights before the optimizer (its moments of pruned weights stay 0) and sets their update to
  ``-param`` after it, so after `optax.apply_updates` pruned weights are exactly 0 whatever the
  optimizer's momentum or decoupled weight decay produced. The masks live in the transform's
  state (`MaskedState`), as in `gradual_magnitude_pruning`: they are checkpointed with the
  optimizer state and are arguments, not constants, of the compiled training step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hoyertrim import penalties
from hoyertrim.masks import polynomial_sparsity, top_k_mask
from hoyertrim.penalties import Penalty, is_kernel, tree_penalty
from hoyertrim.trees import layer_name

LeafFilter = Callable[[tuple, jax.Array], bool]


class PenaltyState(NamedTuple):
    """Step count, to evaluate a strength schedule."""

    count: jax.Array


def _penalty_gradient(value: Callable[[Any], jax.Array], strength,
                      what: str) -> optax.GradientTransformation:
    """Adds ``strength * ∇_params value(params)`` to the updates (``strength``: a float or an
    optax schedule of the step count)."""

    def init(params):
        del params
        return PenaltyState(count=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(f"{what} needs params: call tx.update(grads, state, params).")
        alpha = strength(state.count) if callable(strength) else strength
        penalty_grads = jax.grad(value)(params)
        updates = jax.tree.map(lambda u, g: u + alpha * g.astype(u.dtype), updates, penalty_grads)
        return updates, PenaltyState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def add_penalty_gradient(penalty: Penalty, strength: float | optax.Schedule,
                         where: LeafFilter = is_kernel,
                         per_layer: Mapping[str, Penalty] | None = None
                         ) -> optax.GradientTransformation:
    """Adds ``strength * ∇_params Σ_leaves penalty(leaf)`` to the updates.

    Args:
      penalty: a function of one array returning a scalar (see `hoyertrim.penalties`).
      strength: the coefficient α, a float or an optax schedule of the step count.
      where: ``where(path, leaf)`` selects the regularized leaves (default: Dense/Conv kernels).
      per_layer: {layer name: penalty} instead of ``penalty`` for those layers.

    Returns:
      A `GradientTransformation` whose ``update`` requires ``params``.
    """
    return _penalty_gradient(lambda p: tree_penalty(penalty, p, where, per_layer), strength,
                             "add_penalty_gradient")


def hoyer_square_regularization(strength, where: LeafFilter = is_kernel):
    """DeepHoyer's element-wise Hoyer-Square penalty gradient (chain before the optimizer)."""
    return add_penalty_gradient(penalties.hoyer_square, strength, where)


def _grouped(penalty, groupings):
    """(penalty, per_layer) of a group penalty: ``groupings`` is one list of groupings for
    every kernel, or {layer: groupings} (layers not named get the default groupings)."""
    if isinstance(groupings, Mapping):
        return (penalty, {name: (lambda w, g=tuple(g): penalty(w, g))
                          for name, g in groupings.items()})
    return (lambda w: penalty(w, groupings)), None


def group_hoyer_square_regularization(strength, where: LeafFilter = is_kernel, groupings=None):
    """DeepHoyer's Group-HS penalty gradient (output + input groups of each kernel by default;
    ``groupings``: one list for every kernel, or {layer: groupings} — e.g. each layer's units
    found from the computation, `inspection.unit_groupings`: an attention's heads)."""
    penalty, per_layer = _grouped(penalties.group_hoyer_square, groupings)
    return add_penalty_gradient(penalty, strength, where, per_layer)


def hoyer_regularization(strength, where: LeafFilter = is_kernel):
    """Plain Hoyer ‖w‖₁/‖w‖₂ penalty gradient."""
    return add_penalty_gradient(penalties.hoyer, strength, where)


def l1_regularization(strength, where: LeafFilter = is_kernel):
    """L1 penalty (sub)gradient ``strength * sign(w)``."""
    return add_penalty_gradient(penalties.l1, strength, where)


def group_lasso_regularization(strength, where: LeafFilter = is_kernel, groupings=None):
    """Group lasso penalty gradient (groups as in `group_hoyer_square_regularization`)."""
    penalty, per_layer = _grouped(penalties.group_lasso, groupings)
    return add_penalty_gradient(penalty, strength, where, per_layer)


def transformed_l1_regularization(strength, where: LeafFilter = is_kernel, a: float = 1.0):
    """Transformed L1 Σ (a+1)|w|/(a+|w|) penalty gradient."""
    return add_penalty_gradient(lambda w: penalties.transformed_l1(w, a), strength, where)


def coupled_group_regularization(strength, groups, output_axes: Mapping[str, int],
                                 kind: str = "group_hoyer_square"
                                 ) -> optax.GradientTransformation:
    """Adds ``strength * ∇ penalties.coupled_group_penalty`` to the updates (chain before the
    optimizer, beside the per-layer group penalty): the units of several layers that go only
    together (`inspection.coupled_groups`: a residual stream's channel, written by the stem and
    every block) are penalized as one group each, so they die together.

    Args:
      groups: `inspection.CoupledGroup` s.
      output_axes: {layer: its kernel's output-unit axis}.
      kind: ``"group_hoyer_square"`` or ``"group_lasso"``.
    """
    return _penalty_gradient(
        lambda p: penalties.coupled_group_penalty(p, groups, output_axes, kind), strength,
        "coupled_group_regularization")


REGULARIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "hoyer_square": hoyer_square_regularization,
    "group_hoyer_square": group_hoyer_square_regularization,
    "hoyer": hoyer_regularization,
    "l1": l1_regularization,
    "group_lasso": group_lasso_regularization,
    "transformed_l1": transformed_l1_regularization,
}


def _check_masks(masks: Any, tree: Any) -> None:
    if jax.tree.structure(masks) != jax.tree.structure(tree):
        raise ValueError(
            "masks must be a pytree with the same structure as params (one boolean array per "
            f"leaf; use hoyertrim.masks.full_masks for unpruned leaves).\n  masks:  "
            f"{jax.tree.structure(masks)}\n  params: {jax.tree.structure(tree)}")


class MaskedState(NamedTuple):
    """The masks (a bool pytree shaped like params; True = kept) and the inner optimizer's state."""

    masks: Any
    inner_state: Any


def masked_fine_tuning(inner: optax.GradientTransformation,
                       masks: Any) -> optax.GradientTransformation:
    """Trains only the kept weights with ``inner``; pruned weights stay exactly 0.

    Gradients of pruned weights are zeroed before ``inner`` and their updates set to ``-param``
    after it. (Not `optax.masked`, which runs ``inner`` on the selected leaves and passes the
    others' updates through: here the unselected — pruned — leaves are held at zero.) ``masks``
    seeds the state at ``init``; from then on the masks travel in `MaskedState` (see
    `masks_in_state`), so a restored optimizer state brings its masks back.
    """

    def init(params):
        _check_masks(masks, params)
        return MaskedState(masks=jax.tree.map(lambda m: jnp.asarray(m, bool), masks),
                           inner_state=inner.init(params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("masked_fine_tuning needs params: call tx.update(grads, state, "
                             "params).")
        _check_masks(state.masks, updates)
        updates = jax.tree.map(lambda u, m: jnp.where(m, u, 0), updates, state.masks)
        updates, inner_state = inner.update(updates, state.inner_state, params)
        updates = jax.tree.map(lambda u, m, p: jnp.where(m, u, -p), updates, state.masks, params)
        return updates, MaskedState(state.masks, inner_state)

    return optax.GradientTransformation(init, update)


def masks_in_state(opt_state: Any) -> Any:
    """The masks held by a `masked_fine_tuning` or `gradual_magnitude_pruning` state inside ``opt_state``
    (e.g. a restored checkpoint's), or None if it holds none."""
    holders = (MaskedState, GradualPruningState)
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, holders)):
        if isinstance(node, holders):
            return node.masks
    return None


class GradualPruningState(NamedTuple):
    """Step count and the current masks (a pytree shaped like params)."""

    count: jax.Array
    masks: Any


def gradual_magnitude_pruning(final_sparsity: float | Mapping[str, float], begin_step: int,
                              end_step: int, frequency: int = 100,
                              initial_sparsity: float = 0.0,
                              where: LeafFilter = is_kernel) -> optax.GradientTransformation:
    """Zhu & Gupta's gradual magnitude pruning as a transform; chain it *last*.

    Every ``frequency`` steps between ``begin_step`` and ``end_step`` each selected leaf is
    re-masked to keep its largest-magnitude weights at the sparsity of `polynomial_sparsity`;
    in between, pruned weights are held at exactly 0 as by `masked_fine_tuning`. The masks live in the
    state, so the whole schedule runs inside a jitted training loop.

    Args:
      final_sparsity: removed fraction at the end, one number or ``{layer_name: sparsity}``
        (selected layers not named are not pruned; a name that selects no leaf is an error at
        ``init``).
      begin_step, end_step: the pruning window, in optimizer steps.
      frequency: steps between mask updates.
      initial_sparsity: sparsity at ``begin_step``.
    """
    if frequency < 1:
        raise ValueError(f"frequency must be >= 1, got {frequency}.")

    def target(path):
        if isinstance(final_sparsity, Mapping):
            return final_sparsity.get(layer_name(path), 0.0)
        return final_sparsity

    def init(params):
        if isinstance(final_sparsity, Mapping):  # a misspelt layer would silently stay dense
            selected = {layer_name(path) for path, leaf
                        in jax.tree_util.tree_leaves_with_path(params) if where(path, leaf)}
            unknown = sorted(set(final_sparsity) - selected)
            if unknown:
                raise ValueError(f"final_sparsity names {', '.join(unknown)}: no leaf that "
                                 f"`where` selects; the selected layers are "
                                 f"{', '.join(sorted(selected))}.")
        return GradualPruningState(count=jnp.zeros((), jnp.int32),
                                   masks=jax.tree.map(lambda p: jnp.ones(p.shape, bool), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("gradual_magnitude_pruning needs params.")
        step = state.count
        in_window = (step >= begin_step) & (step <= end_step)
        prune_now = in_window & ((step - begin_step) % frequency == 0)

        def new_mask(path, candidate, mask):
            if not where(path, candidate):
                return mask

            def remask(candidate):
                sparsity = polynomial_sparsity(step, target(path), begin_step, end_step,
                                               initial_sparsity)
                keep = candidate.size - jnp.floor(sparsity * candidate.size).astype(jnp.int32)
                return top_k_mask(jnp.abs(candidate), keep)

            # The sort runs only on pruning steps, not on every step of training.
            return jax.lax.cond(prune_now, remask, lambda _: mask, candidate)

        candidates = jax.tree.map(lambda p, u: p + u, params, updates)
        masks = jax.tree_util.tree_map_with_path(new_mask, candidates, state.masks)
        updates = jax.tree.map(lambda u, m, p: jnp.where(m, u, -p), updates, masks, params)
        return updates, GradualPruningState(count=optax.safe_increment(step), masks=masks)

    return optax.GradientTransformation(init, update)
